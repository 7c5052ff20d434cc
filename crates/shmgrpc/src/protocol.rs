//! Constants and limits of the shmgrpc protocol, each with the section of `docs/protocol.md` that states it: the
//! wire's (versions, header, frame and reference sizes), the handshake's (timeouts, challenge, tickets), and the
//! caps each end enforces on its peer. Client, server, handshake and session code take them from here and nowhere
//! else; constants that are one implementation's tuning, not the protocol's (how many bytes of small frames the
//! writer gathers, below which size the encoder stops looking for shared slices), stay with their code.

use std::time::Duration;

/// Which end of a session (and of each of its calls) this process is. A reference says which end sent it
/// (`from_server`, §6), so a receiver resolves it through its own end of the session it names. Also the `side`
/// label of exported metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Side {
    /// The end that opened the session: a [`crate::ShmChannel`].
    Client,
    /// The end that accepted it: a [`crate::ShmServer`].
    Server,
}

impl Side {
    /// The other end.
    pub(crate) fn peer(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }

    /// The end that sent a reference whose `from_server` flag is `from_server`.
    pub(crate) fn of_sender(from_server: bool) -> Side {
        if from_server { Side::Server } else { Side::Client }
    }

    /// `client` or `server`: the `side` label of exported metrics.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// Highest protocol version this implementation speaks (§2). Version 2 registers segments without a round trip: a
/// reference may name a segment whose `Register` the receiver has not read yet, and the receiver holds the
/// message back until it has (§5, §6). Version 3 numbers calls (the [`CALL_HEADER`]) and adds `CallEnd`, so that
/// the references of messages a cancelled stream discarded are given back (§7). Version 4 carries the call's
/// number in the [`SESSION_HEADER`] itself (one header per call instead of two).
pub const PROTOCOL_VERSION: u32 = 4;

/// First version with call numbers and `CallEnd` (§6, §7).
pub(crate) const CALL_END_VERSION: u32 = 3;

/// First version whose calls carry their number in the session header (§6).
pub(crate) const NUMBER_IN_SESSION_HEADER_VERSION: u32 = 4;

/// Oldest protocol version a server of this crate accepts (§2). Version 1 (wait for `Registered` before
/// referring to a segment) is not spoken any more.
pub const MIN_PROTOCOL_VERSION: u32 = 2;

/// The header that names the session a call belongs to (§6): the session id as 32 lowercase hex digits, and from
/// version 4 on the call's number after a [`CALL_SEPARATOR`] (`<id>.<n>`).
pub const SESSION_HEADER: &str = "shmgrpc-session";

/// The header that numbers a call within its session in version 3 (§6): a decimal `u64` the client chooses,
/// distinct among the session's calls; `CallEnd` names the call by it. Version 4 puts the number in the
/// [`SESSION_HEADER`] instead, and ignores this header.
pub const CALL_HEADER: &str = "shmgrpc-call";

/// What separates the session id from the call's number in a version 4 [`SESSION_HEADER`] (§6).
pub const CALL_SEPARATOR: char = '.';

/// The number a call number's text gives (§6): ASCII decimal digits whose value fits a `u64`. `None` for
/// anything else: the call is then served unnumbered, as in version 2.
pub fn call_number(value: &str) -> Option<u64> {
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// A [`SESSION_HEADER`] value split into the session id's text and, when it carries one (version 4), the text of
/// the call's number: `"<id>.<n>"` gives `("<id>", Some("<n>"))`, `"<id>"` gives `("<id>", None)`.
pub fn split_session_header(value: &str) -> (&str, Option<&str>) {
    match value.split_once(CALL_SEPARATOR) {
        Some((id, number)) => (id, Some(number)),
        None => (value, None),
    }
}

/// The discovery method, answered by the server layer on the gRPC connection itself (§2).
pub const HELLO_PATH: &str = "/shmgrpc.v1.Session/Hello";

/// How long discovery and each handshake step may take (§2, §4).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a ticket from `Hello` stays valid (§2).
pub(crate) const TICKET_TTL: Duration = Duration::from_secs(30);

/// Size of the challenge written into a memfd during the handshake (§4).
pub(crate) const CHALLENGE_LEN: u64 = 32;

/// Largest challenge a client answers (§4); a `Challenge` of 0 bytes or more than this fails the handshake.
pub(crate) const MAX_CHALLENGE_LEN: u64 = 4096;

/// Largest ticket a server issues and a client presents (§2): tickets are opaque to the client.
pub(crate) const MAX_TICKET_LEN: usize = 64;

/// Side-channel handshakes a server runs at once (§4); connections beyond it are closed without a word.
pub(crate) const MAX_HANDSHAKES: usize = 1024;

/// Redeemed tickets a server remembers at once (until they expire, so that each works once, §2); beyond it,
/// handshakes are refused until some expire. Filling it takes that many complete side-channel handshakes by an
/// allowed uid within one ticket lifetime.
pub(crate) const MAX_REDEEMED_TICKETS: usize = 1 << 18;

/// Largest side-channel frame body (§3).
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// Largest reference message (§6).
pub const MAX_REFERENCE_LEN: usize = 40 * 1024;

/// Most parts in one reference (§6).
pub(crate) const MAX_PARTS: usize = 64;

/// Most bytes all `inline` parts of one reference may carry together (§6).
pub(crate) const MAX_INLINE: usize = 32 * 1024;

/// Frames that may wait for the side-channel writer; a peer that lets this many pile up is not reading (§7).
pub(crate) const MAX_QUEUED_FRAMES: usize = 65_536;

/// How long one side-channel write may make no progress before the session is closed (§7).
pub(crate) const WRITE_STALL: Duration = Duration::from_secs(10);

/// How long a receiver holds back a message that names a segment whose registration has not arrived (§6).
/// Afterwards the message is decoded anyway and fails with `INVALID_ARGUMENT`.
pub(crate) const REGISTRATION_WAIT: Duration = Duration::from_secs(2);

/// Most segments one peer may have registered in one session (§5).
pub(crate) const MAX_PEER_SEGMENTS: usize = 4096;

/// Forgotten segment ids a receiver remembers per session, so that they are not registered again and references
/// to them fail at once (§5).
pub(crate) const MAX_FORGOTTEN_IDS: usize = 65_536;

/// Most bytes of segments one peer may have registered in one session (§5).
pub(crate) const MAX_SESSION_PEER_BYTES: u64 = 64 << 30;

/// Most bytes of peer segments this process maps at once, over all sessions (§5).
pub(crate) const MAX_PROCESS_PEER_BYTES: u64 = 1 << 40;

/// Most bytes of segments one peer process may have this process map, over all its sessions (§5): a quarter of the
/// process-wide cap, so that one peer cannot fill it for the others.
pub(crate) const MAX_PEER_BYTES: u64 = MAX_PROCESS_PEER_BYTES / 4;

/// Default size from which a message goes through shared memory.
pub const DEFAULT_THRESHOLD: usize = 64 * 1024;

/// Default in-flight window: bytes of a sender's buffers one peer may hold before the sender waits (§7).
pub const DEFAULT_WINDOW: u64 = 512 << 20;

/// Default bound on the wait for the window to open; after it the message goes inline.
pub const DEFAULT_WINDOW_WAIT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::{call_number, split_session_header};

    #[test]
    fn a_version_4_session_header_splits_at_the_first_dot() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(split_session_header(id), (id, None));
        assert_eq!(split_session_header(&format!("{id}.42")), (id, Some("42")));
        assert_eq!(split_session_header(&format!("{id}.")), (id, Some("")));
        assert_eq!(split_session_header(&format!("{id}.4.2")), (id, Some("4.2")));
    }

    #[test]
    fn a_call_number_is_decimal_digits_that_fit_a_u64() {
        assert_eq!(call_number("0"), Some(0));
        assert_eq!(call_number("0042"), Some(42));
        assert_eq!(call_number("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "+5", "-1", " 5", "5 ", "0x10", "1e3", "18446744073709551616", "٣"] {
            assert_eq!(call_number(bad), None, "{bad:?}");
        }
    }
}
