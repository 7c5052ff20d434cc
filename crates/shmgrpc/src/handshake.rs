//! Both ends of session establishment (protocol §2 and §4): discovery tickets, version negotiation, and the
//! side-channel handshake (uid checks, the memfd challenge and its proof). Everything here runs on the I/O runtime
//! and is bounded by [`HANDSHAKE_TIMEOUT`].
//!
//! Tickets cost the server no state until they are used: a ticket is a random nonce, an expiry and a MAC under a
//! per-server secret, so any number of `Hello` calls can be answered and none can crowd out another caller. Used
//! nonces are remembered until they expire, so a ticket works once.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::UnixStream;

use crate::proto::v1;
use crate::protocol::{
    CHALLENGE_LEN, HANDSHAKE_TIMEOUT, MAX_CHALLENGE_LEN, MAX_REDEEMED_TICKETS, MAX_TICKET_LEN, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, TICKET_TTL,
};
use crate::segment::{Backend, PeerSegment, Segment, SegmentHandle, SegmentOptions};
use crate::session::{Link, SessionId};
use crate::side_channel::{self, FrameReader, peer_credentials, write_frame};
use crate::stats::Fallback;
use crate::wire::Kind;

const NONCE: usize = 16;
const MAC: usize = 16;
/// This server's ticket format: nonce, expiry (8 bytes), truncated MAC.
const TICKET_LEN: usize = NONCE + 8 + MAC;
const _: () = assert!(TICKET_LEN <= MAX_TICKET_LEN);

/// The version a server speaks with a client that speaks up to `requested`, or why there is none.
pub(crate) fn negotiate(requested: u32) -> Result<u32, String> {
    if requested < MIN_PROTOCOL_VERSION {
        return Err(format!(
            "shmgrpc protocol version {requested} is not supported; this server speaks {MIN_PROTOCOL_VERSION} to \
             {PROTOCOL_VERSION}"
        ));
    }
    Ok(requested.min(PROTOCOL_VERSION))
}

/// Whether this implementation speaks `version`.
pub(crate) fn supported(version: u32) -> bool {
    (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
}

/// Issues and redeems tickets (see the module docs).
pub(crate) struct Tickets {
    secret: [u8; 32],
    epoch: Instant,
    /// Nonces of redeemed tickets, with their expiry (milliseconds since `epoch`).
    used: Mutex<HashMap<[u8; NONCE], u64>>,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").finish_non_exhaustive()
    }
}

impl Tickets {
    /// A ticket issuer with a fresh secret.
    ///
    /// # Errors
    ///
    /// The system's random source failed.
    pub(crate) fn new() -> Result<Tickets, getrandom::Error> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)?;
        Ok(Tickets { secret, epoch: Instant::now(), used: Mutex::default() })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn mac(&self, nonce: &[u8], expiry: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(nonce);
        mac.update(expiry);
        mac
    }

    /// A new ticket: nonce, expiry, MAC.
    ///
    /// # Errors
    ///
    /// The system's random source failed.
    pub(crate) fn issue(&self) -> Result<Bytes, getrandom::Error> {
        let mut t = [0u8; TICKET_LEN];
        getrandom::fill(&mut t[..NONCE])?;
        let expiry = (self.now_ms() + TICKET_TTL.as_millis() as u64).to_le_bytes();
        t[NONCE..NONCE + 8].copy_from_slice(&expiry);
        let mac = self.mac(&t[..NONCE], &expiry).finalize().into_bytes();
        t[NONCE + 8..].copy_from_slice(&mac[..MAC]);
        Ok(Bytes::copy_from_slice(&t))
    }

    /// Accepts a ticket this server issued, once, before it expires.
    pub(crate) fn redeem(&self, ticket: &[u8]) -> Result<(), &'static str> {
        const BAD: &str = "unknown or expired ticket";
        if ticket.len() != TICKET_LEN {
            return Err(BAD);
        }
        let (nonce, rest) = ticket.split_at(NONCE);
        let (expiry, mac) = rest.split_at(8);
        self.mac(nonce, expiry).verify_truncated_left(mac).map_err(|_| BAD)?;
        let expiry = u64::from_le_bytes(expiry.try_into().expect("8 bytes"));
        let now = self.now_ms();
        if expiry <= now {
            return Err(BAD);
        }
        let mut used = crate::sync::lock(&self.used);
        if used.len() >= MAX_REDEEMED_TICKETS / 2 {
            used.retain(|_, &mut e| e > now);
        }
        if used.len() >= MAX_REDEEMED_TICKETS {
            return Err("too many handshakes; try again later");
        }
        match used.entry(nonce.try_into().expect("NONCE bytes")) {
            std::collections::hash_map::Entry::Occupied(_) => Err(BAD),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(expiry);
                Ok(())
            }
        }
    }
}

/// A side channel that passed the server's half of the handshake, ready for `Welcome`.
pub(crate) type Accepted = Link;

/// The server's half (§4): uid check, `Attach` with a good ticket, the challenge and its proof. A refusal is
/// answered with `Refused { reason }` and returned.
pub(crate) async fn accept(
    socket: UnixStream,
    allowed: &HashSet<u32>,
    tickets: &Tickets,
) -> Result<Accepted, &'static str> {
    let socket = Arc::new(socket);
    let mut reader = FrameReader::default();
    let steps = async {
        let cred = peer_credentials(socket.as_fd()).map_err(|_| "no peer credentials")?;
        if !allowed.contains(&cred.uid) {
            return Err("uid not allowed");
        }
        let attach = match reader.next(&socket).await {
            Ok(Some((v1::SideMessage { kind: Some(Kind::Attach(a)) }, None))) => a,
            _ => return Err("expected attach"),
        };
        if !supported(attach.version) {
            return Err("unsupported protocol version");
        }
        tickets.redeem(&attach.ticket)?;
        // The challenge: random bytes in a sealed memfd. Only a process that can map it can answer.
        let mut challenge =
            Segment::create(CHALLENGE_LEN as usize, &SegmentOptions::new(Backend::Memfd)).map_err(|_| "challenge")?;
        getrandom::fill(challenge.as_mut_slice()).map_err(|_| "randomness")?;
        let SegmentHandle::Memfd(fd) = challenge.share().map_err(|_| "share")? else { return Err("memfd") };
        write_frame(&socket, Kind::Challenge(v1::Challenge { len: CHALLENGE_LEN }), Some(fd.as_fd()))
            .await
            .map_err(|_| "write")?;
        drop(fd);
        let proof = match reader.next(&socket).await {
            Ok(Some((v1::SideMessage { kind: Some(Kind::Proof(p)) }, None))) => p,
            _ => return Err("expected proof"),
        };
        if proof.answer.as_ref() != challenge.as_slice() {
            return Err("wrong answer to the challenge");
        }
        Ok((cred.pid, attach.version))
    };
    let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, steps).await.unwrap_or(Err("handshake timed out"));
    match result {
        Ok((peer_pid, version)) => Ok(Link { socket, reader, peer_pid, version, peer_threshold: None }),
        Err(why) => {
            let refused = write_frame(&socket, Kind::Refused(v1::Refused { reason: why.into() }), None);
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, refused).await;
            Err(why)
        }
    }
}

/// What the client's half of the handshake established.
pub(crate) struct Joined {
    pub(crate) id: SessionId,
    pub(crate) link: Link,
}

/// The client's half (§4): connect, check the server's uid, present the ticket, answer the challenge, receive
/// `Welcome`. Runs on the I/O runtime.
///
/// `candidates` are the places to look for the side channel, in order (see `client::side_channel_candidates`): the
/// first that accepts a connection is used. Each must be an absolute path, or `@name` (abstract).
pub(crate) async fn join(candidates: Vec<PathBuf>, ticket: Bytes, version: u32) -> Result<Joined, Fallback> {
    let mut socket = None;
    for path in candidates {
        if !path.is_absolute() && side_channel::abstract_name(&path).is_none() {
            tracing::debug!("shmgrpc side channel is neither an absolute path nor an abstract name");
            continue;
        }
        if let Ok(Ok(s)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, side_channel::connect(&path)).await {
            socket = Some(Arc::new(s));
            break;
        }
    }
    let Some(socket) = socket else {
        tracing::debug!("shmgrpc side channel unreachable");
        return Err(Fallback::SideChannelUnreachable);
    };
    let failed = |why: &str| {
        tracing::debug!(why, "shmgrpc handshake failed");
        Fallback::HandshakeFailed
    };
    let mut reader = FrameReader::default();
    let steps = async {
        let cred = peer_credentials(socket.as_fd()).map_err(|_| failed("no peer credentials"))?;
        let server_uid = cred.uid;
        if server_uid != rustix::process::getuid().as_raw() && server_uid != 0 {
            return Err(failed("server runs under another uid"));
        }
        write_frame(&socket, Kind::Attach(v1::Attach { version, ticket }), None).await.map_err(|_| failed("write"))?;
        let (ch, fd) = match reader.next(&socket).await {
            Ok(Some((v1::SideMessage { kind: Some(Kind::Challenge(ch)) }, Some(fd)))) => (ch, fd),
            Ok(Some((v1::SideMessage { kind: Some(Kind::Refused(r)) }, _))) => {
                tracing::info!(reason = %r.reason, "shmgrpc server refused the session");
                return Err(Fallback::HandshakeFailed);
            }
            _ => return Err(failed("expected a challenge with one descriptor")),
        };
        if ch.len == 0 || ch.len > MAX_CHALLENGE_LEN {
            return Err(failed("challenge of an odd size"));
        }
        let seg = PeerSegment::open(SegmentHandle::Memfd(fd), ch.len).map_err(|_| failed("challenge segment"))?;
        let answer = seg.range(0, ch.len).map_err(|_| failed("challenge range"))?.to_vec();
        drop(seg);
        write_frame(&socket, Kind::Proof(v1::Proof { answer: answer.into() }), None)
            .await
            .map_err(|_| failed("write"))?;
        let welcome = match reader.next(&socket).await {
            Ok(Some((v1::SideMessage { kind: Some(Kind::Welcome(w)) }, None))) => w,
            Ok(Some((v1::SideMessage { kind: Some(Kind::Refused(r)) }, _))) => {
                tracing::info!(reason = %r.reason, "shmgrpc server refused the session");
                return Err(Fallback::HandshakeFailed);
            }
            _ => return Err(failed("expected welcome")),
        };
        let id: SessionId = welcome.session.as_ref().try_into().map_err(|_| failed("bad session id"))?;
        // Any value is harmless: it only says which of the server's messages to expect by reference.
        let threshold = usize::try_from(welcome.threshold).unwrap_or(usize::MAX);
        Ok((id, cred.pid, threshold))
    };
    let (id, peer_pid, threshold) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, steps).await.unwrap_or_else(|_| Err(failed("timed out")))?;
    Ok(Joined { id, link: Link { socket, reader, peer_pid, version, peer_threshold: Some(threshold) } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_work_once_and_only_if_issued_here() {
        let t = Tickets::new().unwrap();
        let a = t.issue().unwrap();
        assert_eq!(t.redeem(&a), Ok(()));
        assert!(t.redeem(&a).is_err(), "a ticket works once");
        let other = Tickets::new().unwrap().issue().unwrap();
        assert!(t.redeem(&other).is_err(), "another server's ticket");
        let mut forged = t.issue().unwrap().to_vec();
        forged[NONCE] ^= 1; // a later expiry, same MAC
        assert!(t.redeem(&forged).is_err());
        assert!(t.redeem(&[0; TICKET_LEN]).is_err());
        assert!(t.redeem(&[]).is_err());
    }

    #[test]
    fn tickets_expire_after_their_lifetime() {
        let mut t = Tickets::new().unwrap();
        let (a, b) = (t.issue().unwrap(), t.issue().unwrap());
        assert_eq!(t.redeem(&a), Ok(()), "fresh");
        // The issuer's clock moves on by the ticket's lifetime.
        t.epoch = t.epoch.checked_sub(TICKET_TTL).expect("the machine has been up for longer than a ticket lives");
        assert_eq!(t.redeem(&b), Err("unknown or expired ticket"), "expired");
        assert_eq!(t.redeem(&t.issue().unwrap()), Ok(()), "a new one works");
    }

    #[test]
    fn issuing_keeps_no_state() {
        let t = Tickets::new().unwrap();
        for _ in 0..50_000 {
            t.issue().unwrap();
        }
        assert!(t.used.lock().unwrap().is_empty());
        assert_eq!(t.redeem(&t.issue().unwrap()), Ok(()));
    }

    #[test]
    fn versions_negotiate_down_to_what_both_speak() {
        assert_eq!(negotiate(PROTOCOL_VERSION + 5), Ok(PROTOCOL_VERSION));
        assert_eq!(negotiate(PROTOCOL_VERSION), Ok(PROTOCOL_VERSION));
        assert!(negotiate(1).is_err());
        assert!(supported(PROTOCOL_VERSION) && !supported(1) && !supported(PROTOCOL_VERSION + 1));
    }
}
