//! The client cases: each starts a [`Fake`] server with a script, runs the client command against it, and checks
//! what the client did.

use std::time::Duration;

use shmgrpc::protocol::split_session_header;

use crate::fake::{Fake, HandshakeMode, HelloMode, RegisterMode, ReplyMode, Script, Seen};

/// A client case: the server's script and the check of what the client did (its exit status and what it sent).
#[derive(Debug, Clone, Copy)]
pub struct ClientCase {
    /// A stable name: `client.<what>`.
    pub id: &'static str,
    /// The section of docs/protocol.md the rule is in.
    pub section: &'static str,
    /// The rule, as the case checks it.
    pub rule: &'static str,
    /// The fake server's behaviour.
    pub script: Script,
    /// The check: the command's success, and what the server saw (after the command ended).
    pub check: fn(bool, &Fake) -> Result<(), String>,
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn succeeded(ok: bool) -> Result<(), String> {
    ensure(ok, || "the call failed: a client must fall back to ordinary gRPC, never fail the call".into())
}

fn inline_only(f: &Fake) -> Result<(), String> {
    let refs = f.seen(|s| s.requests.iter().filter(|r| r.0).count());
    ensure(refs == 0, || format!("{refs} request(s) sent as references without a session"))?;
    ensure(f.seen(|s| !s.requests.is_empty()), || "no request reached the server".into())
}

fn hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the headers of the first request that came as a reference, in a session of `version` (3 or 4): the
/// session's id, and the call's number in the session header (version 4) or in `shmgrpc-call` (version 3).
fn numbered_reference(s: &Seen, version: u32) -> Result<(), String> {
    ensure(s.faults.is_empty(), || s.faults.join("; "))?;
    let id = s.session.ok_or("no session was welcomed")?;
    let r = s.requests.iter().find(|r| r.0).ok_or("no request came as a reference")?;
    let value = r.1.as_deref().ok_or("the reference's call has no session header")?;
    let (session, in_session) = split_session_header(value);
    ensure(session == hex(&id), || format!("session header {value:?}"))?;
    let number = if version >= 4 {
        ensure(r.2.is_none(), || format!("a version 4 call with a shmgrpc-call header ({:?})", r.2))?;
        in_session
    } else {
        ensure(in_session.is_none(), || format!("a version 3 session header with a call number: {value:?}"))?;
        r.2.as_deref()
    };
    let n = number.ok_or("the call has no number")?;
    ensure(!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()), || format!("call number {n:?} is not decimal"))
}

pub(crate) fn all() -> Vec<ClientCase> {
    let d = Script::default();
    vec![
        ClientCase {
            id: "client.plain-server",
            section: "§2",
            rule: "Hello answered UNIMPLEMENTED: the client sends every message inline and its calls succeed",
            script: Script { hello: HelloMode::Unimplemented, ..d },
            check: |ok, f| {
                succeeded(ok)?;
                inline_only(f)?;
                ensure(f.seen(|s| s.connections) == 0, || "the client connected to a side channel anyway".into())
            },
        },
        ClientCase {
            id: "client.no-common-version",
            section: "§2",
            rule: "A HelloResponse version the client does not speak: no side channel, calls inline",
            script: Script { hello: HelloMode::Version(1), ..d },
            check: |ok, f| {
                succeeded(ok)?;
                inline_only(f)?;
                ensure(f.seen(|s| s.connections) == 0, || "the client connected to a side channel anyway".into())
            },
        },
        ClientCase {
            id: "client.ticket-unchanged",
            section: "§4",
            rule: "The client presents the ticket unchanged in Attach (here one of 64 bytes)",
            script: Script { ticket_len: 64, ..d },
            check: |ok, f| {
                succeeded(ok)?;
                f.seen(|s| match &s.attached {
                    Some(t) if *t == s.ticket => Ok(()),
                    Some(t) => Err(format!("presented {} bytes that are not the ticket", t.len())),
                    None => Err("no Attach".into()),
                })
            },
        },
        ClientCase {
            id: "client.refused",
            section: "§4",
            rule: "A handshake the server refuses leaves the client inline; its calls succeed",
            script: Script { handshake: HandshakeMode::Refuse, ..d },
            check: |ok, f| {
                succeeded(ok)?;
                inline_only(f)
            },
        },
        ClientCase {
            id: "client.big-challenge",
            section: "§4",
            rule: "A Challenge of more than 4 096 bytes fails the handshake: no Proof, calls inline",
            script: Script { handshake: HandshakeMode::ChallengeLen(4097), ..d },
            check: |ok, f| {
                succeeded(ok)?;
                ensure(!f.seen(|s| s.proof), || "the client answered a 4 097-byte challenge".into())?;
                inline_only(f)
            },
        },
        ClientCase {
            id: "client.unsealed-challenge",
            section: "§4",
            rule: "A challenge memfd without the shrink and grow seals fails the handshake: no Proof, calls inline",
            script: Script { handshake: HandshakeMode::Unsealed, ..d },
            check: |ok, f| {
                succeeded(ok)?;
                ensure(!f.seen(|s| s.proof), || "the client answered an unsealed challenge".into())?;
                inline_only(f)
            },
        },
        ClientCase {
            id: "client.reference",
            section: "§6",
            rule: "With a session, a large request is a canonical reference, and its call carries the session's \
                   header: 32 lowercase hex digits, and from version 4 a dot and a decimal call number",
            script: d,
            check: |ok, f| {
                succeeded(ok)?;
                f.seen(|s| numbered_reference(s, 4))
            },
        },
        ClientCase {
            id: "client.reference-v3",
            section: "§6",
            rule: "In a version 3 session, the call of a reference carries the session's header (32 lowercase hex \
                   digits alone) and a decimal call number in shmgrpc-call",
            script: Script { hello: HelloMode::Version(3), ..d },
            check: |ok, f| {
                succeeded(ok)?;
                f.seen(|s| numbered_reference(s, 3))
            },
        },
        ClientCase {
            id: "client.registration-refused",
            section: "§5",
            rule: "A registration the server refuses never fails the call: the message goes inline",
            script: Script { register: RegisterMode::Refuse, ..d },
            check: |ok, f| {
                succeeded(ok)?;
                f.seen(|s| {
                    ensure(!s.registrations.is_empty(), || "the client registered nothing".into())?;
                    ensure(s.faults.is_empty(), || s.faults.join("; "))?;
                    ensure(s.requests.iter().any(|r| !r.0), || "no request came inline after the refusal".into())
                })
            },
        },
        ClientCase {
            id: "client.releases",
            section: "§7",
            rule: "A reply in the server's segment (a sender part) is released once read: Release with its \
                   generation",
            script: Script { reply: ReplyMode::Sender, ..d },
            check: |ok, f| {
                succeeded(ok)?;
                let got = f.wait_for(Duration::from_secs(5), |s| s.releases.iter().any(|r| r.1 == 5));
                ensure(got, || format!("no Release of generation 5; releases {:?}", f.seen(|s| s.releases.clone())))
            },
        },
        ClientCase {
            id: "client.held-back",
            section: "§6",
            rule: "A reply reference that arrives before its segment's registration is held back until the \
                   registration is in (here 300 ms later), then read and released",
            script: Script { reply: ReplyMode::SenderAhead, ..d },
            check: |ok, f| {
                succeeded(ok)?;
                let got = f.wait_for(Duration::from_secs(5), |s| s.releases.iter().any(|r| r.1 == 5));
                ensure(got, || format!("no Release of generation 5; releases {:?}", f.seen(|s| s.releases.clone())))?;
                f.seen(|s| ensure(s.faults.is_empty(), || s.faults.join("; ")))
            },
        },
        ClientCase {
            id: "client.returned",
            section: "§7",
            rule: "A reply that sends the client's own region back (a receiver part) is answered Returned",
            script: Script { reply: ReplyMode::Receiver, ..d },
            check: |ok, f| {
                succeeded(ok)?;
                let got = f.wait_for(Duration::from_secs(5), |s| !s.returned.is_empty());
                ensure(got, || "no Returned for the region sent back".into())
            },
        },
    ]
}
