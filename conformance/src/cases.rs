//! The cases, by section of docs/protocol.md. Each states its rule and checks it against the server.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use shmgrpc::proto::v1::{self, part};
use shmgrpc::protocol::{CALL_HEADER, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SESSION_HEADER};
use shmgrpc::wire::{self, Kind};
use shmgrpc_demo::Payload;

use crate::peer::{Session, Target, memfd, sealed_memfd};
use crate::{Case, Check};

const ECHO: &str = "/shmgrpc.demo.v1.Blob/Echo";
const UPLOAD: &str = "/shmgrpc.demo.v1.Blob/Upload";
const DOWNLOAD: &str = "/shmgrpc.demo.v1.Blob/Download";

type Checked = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

macro_rules! case {
    ($section:literal, $id:literal, $rule:literal, $check:ident) => {
        Case {
            id: $id,
            section: $section,
            rule: $rule,
            check: (|t: Target| -> Checked { Box::pin($check(t)) }) as Check,
        }
    };
}

pub(crate) fn all() -> Vec<Case> {
    vec![
        case!(
            "§2",
            "hello.negotiates",
            "Hello answers the highest version both speak: at most the client's, at least 2",
            hello_negotiates
        ),
        case!(
            "§2",
            "hello.too-old",
            "Hello for a version the server does not speak is answered FAILED_PRECONDITION",
            hello_too_old
        ),
        case!(
            "§2",
            "hello.answer",
            "HelloResponse: side_channel an absolute path or @name, a ticket of 1 to 64 bytes",
            hello_answer
        ),
        case!(
            "§2",
            "hello.stateless",
            "Hello calls cost the server no lasting state: after 2 000 of them a session still opens",
            hello_stateless
        ),
        case!(
            "§4",
            "handshake.welcome",
            "Attach with a fresh ticket, the proof of the challenge: Welcome with a 16-byte session id",
            handshake_welcome
        ),
        case!(
            "§4",
            "handshake.challenge",
            "Challenge: one sealed memfd (shrink and grow) of at least len bytes, len from 1 to 4 096",
            handshake_challenge
        ),
        case!(
            "§4",
            "handshake.unknown-ticket",
            "Attach with a ticket the server did not issue: Refused, then the connection closes",
            handshake_unknown_ticket
        ),
        case!("§4", "handshake.ticket-once", "A ticket works once: a failed proof uses it up", handshake_ticket_once),
        case!(
            "§4",
            "handshake.wrong-proof",
            "A proof that is not the challenge's bytes: Refused, then the connection closes",
            handshake_wrong_proof
        ),
        case!(
            "§4",
            "handshake.attach-first",
            "A frame other than Attach first: the connection closes",
            handshake_attach_first
        ),
        case!(
            "§4",
            "handshake.old-version",
            "Attach with a version the server does not speak: Refused, then the connection closes",
            handshake_old_version
        ),
        case!(
            "§4",
            "handshake.timeout",
            "A handshake that does not complete within 5 s (in all): the connection closes",
            handshake_timeout
        ),
        case!("§3", "frame.garbage", "Bytes that are no frame: the connection closes", frame_garbage),
        case!("§3", "frame.too-long", "A frame length above 64 KiB: the connection closes", frame_too_long),
        case!(
            "§3",
            "frame.no-kind",
            "A frame whose message has no kind this version knows: the connection closes",
            frame_no_kind
        ),
        case!(
            "§3",
            "frame.descriptor-mid-frame",
            "A descriptor that arrives with bytes in which no frame starts: the session closes",
            frame_descriptor_mid_frame
        ),
        case!(
            "§3",
            "frame.unexpected-kind",
            "A handshake frame on an established session: the session closes",
            frame_unexpected_kind
        ),
        case!(
            "§3",
            "frame.two-descriptors",
            "More than one descriptor for one frame: the session closes",
            frame_two_descriptors
        ),
        case!(
            "§3",
            "frame.descriptor-on-release",
            "A descriptor on a frame of a kind that carries none (a Release): the session closes",
            frame_descriptor_on_release
        ),
        case!(
            "§5",
            "register.memfd",
            "Register of a sealed memfd at least as long as len: Registered without error",
            register_memfd
        ),
        case!(
            "§5",
            "register.unsealed",
            "Register of a memfd without the shrink and grow seals: Registered with an error",
            register_unsealed
        ),
        case!("§5", "register.short", "Register of a memfd shorter than len: Registered with an error", register_short),
        case!(
            "§5",
            "register.no-source",
            "Register with neither a descriptor nor a name or id: Registered with an error",
            register_no_source
        ),
        case!(
            "§5",
            "register.two-sources",
            "Register with a descriptor and a name: Registered with an error",
            register_two_sources
        ),
        case!(
            "§5",
            "register.not-memfd",
            "Register of a descriptor that is no memfd (a pipe): Registered with an error",
            register_not_memfd
        ),
        case!(
            "§5",
            "register.foreign-name",
            "Register of a POSIX name another process created: Registered with an error",
            register_foreign_name
        ),
        case!(
            "§5",
            "register.duplicate",
            "Register of an id already mapped: an error, and the first mapping stays",
            register_duplicate
        ),
        case!(
            "§5",
            "register.segment-cap",
            "Limits: a server refuses registrations beyond its cap of segments per session (shmgrpc: 4 096); the \
             session goes on",
            register_segment_cap
        ),
        case!(
            "§5",
            "register.bytes-cap",
            "Limits: a segment beyond the server's cap of bytes per session (shmgrpc: 64 GiB, real size) is refused",
            register_bytes_cap
        ),
        case!(
            "§5",
            "forget.final",
            "After Forget an id is never mapped again, and a reference to it fails at once with INVALID_ARGUMENT",
            forget_final
        ),
        case!(
            "§6",
            "response.inline-without-header",
            "A call without the shmgrpc-session header gets no reference in its response, however large",
            response_inline_without_header
        ),
        case!(
            "§6",
            "call.malformed-number",
            "A call whose number is not a decimal number (in the session header from version 4, in shmgrpc-call in \
             version 3) is served (as in version 2)",
            call_malformed_number
        ),
        case!(
            "§6",
            "call.number-in-session-header",
            "From version 4, a call whose shmgrpc-session header is the session's id, a dot and a decimal number is \
             the session's: its large response comes as a reference",
            call_number_in_session_header
        ),
        case!(
            "§6",
            "reference.echo",
            "A reference to a registered segment is read as the message; the reply resolves to it",
            reference_echo
        ),
        case!(
            "§7",
            "release.after-read",
            "Every sender part read is released (Release with its generation); a receiver part answered Returned is let go",
            release_after_read
        ),
        case!(
            "§6",
            "reference.held-back",
            "A reference that overtakes its segment's Register is held back until it arrives",
            reference_held_back
        ),
        case!(
            "§6",
            "reference.unregistered",
            "A reference to a segment never registered: INVALID_ARGUMENT (after at most 2 s)",
            reference_unregistered
        ),
        case!(
            "§9",
            "reference.closed-while-held",
            "The session closes while a reference waits for its registration: FAILED_PRECONDITION",
            reference_closed_while_held
        ),
        case!(
            "§9",
            "reference.malformed",
            "Field 19999 that holds no Reference: INVALID_ARGUMENT",
            reference_malformed
        ),
        case!(
            "§9",
            "reference.unknown-session",
            "A reference naming no live session of the server's: FAILED_PRECONDITION",
            reference_unknown_session
        ),
        case!(
            "§9",
            "reference.from-server",
            "A request reference that says it comes from the server: FAILED_PRECONDITION",
            reference_from_server
        ),
        case!("§9", "reference.no-parts", "A reference without parts: INVALID_ARGUMENT", reference_no_parts),
        case!(
            "§9",
            "reference.too-many-parts",
            "A reference with 65 parts: INVALID_ARGUMENT",
            reference_too_many_parts
        ),
        case!(
            "§9",
            "reference.part-without-kind",
            "A part without a kind: INVALID_ARGUMENT",
            reference_part_without_kind
        ),
        case!(
            "§9",
            "reference.too-much-inline",
            "More than 32 KiB of inline bytes: INVALID_ARGUMENT",
            reference_too_much_inline
        ),
        case!("§9", "reference.out-of-range", "A region past the segment's end: OUT_OF_RANGE", reference_out_of_range),
        case!(
            "§9",
            "reference.offset-overflow",
            "A region whose offset plus length overflows: OUT_OF_RANGE",
            reference_offset_overflow
        ),
        case!(
            "§9",
            "reference.receiver-not-held",
            "A receiver part naming a buffer the peer does not hold: INVALID_ARGUMENT",
            reference_receiver_not_held
        ),
        case!(
            "§6",
            "reference.trailing-field",
            "A reference message with a field besides 19999: INVALID_ARGUMENT",
            reference_trailing_field
        ),
        case!(
            "§6",
            "reference.not-canonical",
            "A reference not encoded canonically (an overlong length varint): INVALID_ARGUMENT",
            reference_not_canonical
        ),
        case!(
            "§9",
            "reference.does-not-decode",
            "Bytes in shared memory that are not the message type: INVALID_ARGUMENT",
            reference_does_not_decode
        ),
        case!(
            "§9",
            "inline.does-not-decode",
            "Inline bytes that are not the message type: INVALID_ARGUMENT",
            inline_does_not_decode
        ),
        case!(
            "§7",
            "release.bogus-ignored",
            "Releases and Returned for buffers the peer does not hold are ignored: the session goes on",
            release_bogus_ignored
        ),
        case!("§1", "server.still-serves", "After all of the above, a new session still works", server_still_serves),
    ]
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn code_is(r: Result<Bytes, tonic::Status>, want: tonic::Code) -> Result<(), String> {
    match r {
        Ok(_) => Err(format!("answered OK, expected {want:?}")),
        Err(s) if s.code() == want => {
            ensure(!s.message().contains("/shmgrpc-"), || format!("the status names a segment: {}", s.message()))
        }
        Err(s) => Err(format!("answered {:?} ({}), expected {want:?}", s.code(), s.message())),
    }
}

/// Whether an echo is the message sent: equal once decoded (an implementation may encode fields in another order).
fn same_payload(got: &[u8], sent: &[u8]) -> Result<(), String> {
    let decode = |b: &[u8]| Payload::decode(b).map_err(|e| format!("the echo does not decode: {e}"));
    ensure(decode(got)? == decode(sent)?, || "the echo differs from the request".into())
}

fn reference(session: &[u8], from_server: bool, parts: Vec<v1::Part>) -> Bytes {
    let mut out = Vec::new();
    wire::encode_reference(v1::Reference { session: Bytes::copy_from_slice(session), from_server, parts }, &mut out);
    out.into()
}

fn sender(segment: u32, generation: u32, offset: u64, len: u64) -> v1::Part {
    v1::Part { kind: Some(part::Kind::Sender(v1::Region { segment, generation, offset, len })) }
}

fn receiver(segment: u32, generation: u32, offset: u64, len: u64) -> v1::Part {
    v1::Part { kind: Some(part::Kind::Receiver(v1::Region { segment, generation, offset, len })) }
}

fn inline(b: &[u8]) -> v1::Part {
    v1::Part { kind: Some(part::Kind::Inline(Bytes::copy_from_slice(b))) }
}

/// A session with segment 1 registered: 1 MiB holding an encoded Payload of `size` bytes; returns the encoding.
async fn with_payload(t: &Target, size: usize) -> Result<(Session, Vec<u8>), String> {
    let s = t.session().await?;
    let body = shmgrpc_demo::payload(size, 7).encode_to_vec();
    let answer = s.register(1, 1 << 20, None, Some(sealed_memfd(1 << 20, &body)?)).await?;
    ensure(answer.is_empty(), || format!("a good registration was refused: {answer}"))?;
    Ok((s, body))
}

/// The message a reply stands for, resolved like a receiver does: sender parts from the server's segments
/// (released afterwards), receiver parts from `ours`, the bytes we sent in segment 1 (answered Returned).
async fn resolve(s: &Session, reply: &[u8], ours: &[u8]) -> Result<Vec<u8>, String> {
    resolve_in(s, reply, 1, ours).await
}

/// [`resolve`] with our bytes in segment `our_segment`.
async fn resolve_in(s: &Session, reply: &[u8], our_segment: u32, ours: &[u8]) -> Result<Vec<u8>, String> {
    if !wire::is_reference(reply) {
        return Ok(reply.to_vec());
    }
    let r = wire::decode_reference(reply).map_err(|e| format!("the reply is no valid reference: {e}"))?;
    ensure(r.from_server, || "a reply reference that does not say it comes from the server".into())?;
    ensure(r.session.as_ref() == s.id, || "a reply reference naming another session".into())?;
    let mut out = Vec::new();
    let mut answers = Vec::new();
    for p in r.parts {
        match p.kind {
            Some(part::Kind::Inline(b)) => out.extend_from_slice(&b),
            Some(part::Kind::Sender(reg)) => {
                let seg = s
                    .wait("the server's registration of the segment its reply names", move |seen| {
                        seen.segments.get(&reg.segment).cloned()
                    })
                    .await?;
                let bytes = seg.range(reg.offset, reg.len).map_err(|e| format!("the reply's region: {e}"))?;
                out.extend_from_slice(bytes);
                answers.push(Kind::Release(v1::Release { segment: reg.segment, generation: reg.generation }));
            }
            Some(part::Kind::Receiver(reg)) => {
                ensure(reg.segment == our_segment, || {
                    format!("a receiver part naming segment {} of ours", reg.segment)
                })?;
                let (a, n) = (reg.offset as usize, reg.len as usize);
                let bytes = ours.get(a..a + n).ok_or("a receiver part outside what we sent")?;
                out.extend_from_slice(bytes);
                answers.push(Kind::Returned(v1::Returned { segment: reg.segment, generation: reg.generation }));
            }
            None => return Err("a reply part without a kind".into()),
        }
    }
    for a in answers {
        s.side.send(a).await?;
    }
    Ok(out)
}

async fn hello_negotiates(t: Target) -> Result<(), String> {
    let h = t.hello(PROTOCOL_VERSION + 3).await.map_err(|s| s.to_string())?;
    ensure(h.version >= MIN_PROTOCOL_VERSION && h.version <= PROTOCOL_VERSION + 3, || {
        format!("answered version {} to a client of version {}", h.version, PROTOCOL_VERSION + 3)
    })?;
    let h2 = t.hello(MIN_PROTOCOL_VERSION).await.map_err(|s| s.to_string())?;
    ensure(h2.version == MIN_PROTOCOL_VERSION, || format!("answered version {} to a version-2 client", h2.version))
}

async fn hello_too_old(t: Target) -> Result<(), String> {
    match t.hello(1).await {
        Ok(h) => Err(format!("answered version {} to a version-1 client", h.version)),
        Err(s) => ensure(s.code() == tonic::Code::FailedPrecondition, || format!("answered {s}")),
    }
}

async fn hello_answer(t: Target) -> Result<(), String> {
    let h = t.hello(PROTOCOL_VERSION).await.map_err(|s| s.to_string())?;
    ensure(h.side_channel.starts_with('/') || h.side_channel.starts_with('@'), || {
        format!("side_channel {:?} is neither an absolute path nor @name", h.side_channel)
    })?;
    ensure((1..=64).contains(&h.ticket.len()), || format!("a ticket of {} bytes", h.ticket.len()))
}

async fn hello_stateless(t: Target) -> Result<(), String> {
    for _ in 0..2000 {
        t.hello(PROTOCOL_VERSION).await.map_err(|s| s.to_string())?;
    }
    t.session().await.map(drop)
}

async fn handshake_welcome(t: Target) -> Result<(), String> {
    t.session().await.map(drop)
}

async fn handshake_challenge(t: Target) -> Result<(), String> {
    let (side, hello) = t.side().await?;
    side.send(Kind::Attach(v1::Attach { version: hello.version, ticket: hello.ticket })).await?;
    let (m, fds) = side.next().await?.ok_or("closed")?;
    let Some(Kind::Challenge(ch)) = m.kind else { return Err(format!("expected a challenge, got {m:?}")) };
    ensure(fds.len() == 1, || format!("{} descriptors with the challenge", fds.len()))?;
    ensure((1..=4096).contains(&ch.len), || format!("a challenge of {} bytes", ch.len))?;
    let fd = fds.into_iter().next().expect("one");
    shmgrpc::PeerSegment::open(shmgrpc::SegmentHandle::Memfd(fd), ch.len)
        .map(drop)
        .map_err(|e| format!("the challenge's memfd: {e}"))
}

async fn refused_and_closed(side: &crate::peer::Side) -> Result<(), String> {
    match side.closed().await? {
        Some(_) => Ok(()),
        None => Err("closed without a Refused frame".into()),
    }
}

async fn handshake_unknown_ticket(t: Target) -> Result<(), String> {
    let (side, hello) = t.side().await?;
    side.send(Kind::Attach(v1::Attach { version: hello.version, ticket: vec![0; 40].into() })).await?;
    refused_and_closed(&side).await
}

async fn handshake_ticket_once(t: Target) -> Result<(), String> {
    let (side, hello) = t.side().await?;
    let ticket = hello.ticket.clone();
    side.send(Kind::Attach(v1::Attach { version: hello.version, ticket: ticket.clone() })).await?;
    let _ = side.next().await?.ok_or("closed before the challenge")?;
    side.send(Kind::Proof(v1::Proof { answer: vec![0; 32].into() })).await?;
    refused_and_closed(&side).await?;
    let (again, _) = t.side().await?;
    again.send(Kind::Attach(v1::Attach { version: hello.version, ticket })).await?;
    refused_and_closed(&again).await
}

async fn handshake_wrong_proof(t: Target) -> Result<(), String> {
    let (side, hello) = t.side().await?;
    side.send(Kind::Attach(v1::Attach { version: hello.version, ticket: hello.ticket })).await?;
    let (m, _) = side.next().await?.ok_or("closed before the challenge")?;
    let Some(Kind::Challenge(ch)) = m.kind else { return Err(format!("expected a challenge, got {m:?}")) };
    side.send(Kind::Proof(v1::Proof { answer: vec![0xA5; ch.len as usize].into() })).await?;
    refused_and_closed(&side).await
}

async fn handshake_attach_first(t: Target) -> Result<(), String> {
    let (side, _) = t.side().await?;
    side.send(Kind::Proof(v1::Proof { answer: Bytes::from_static(b"early") })).await?;
    side.closed().await.map(drop)
}

async fn handshake_old_version(t: Target) -> Result<(), String> {
    let (side, hello) = t.side().await?;
    side.send(Kind::Attach(v1::Attach { version: 1, ticket: hello.ticket })).await?;
    refused_and_closed(&side).await
}

async fn handshake_timeout(t: Target) -> Result<(), String> {
    let (side, _) = t.side().await?;
    let start = Instant::now();
    side.closed().await?;
    let took = start.elapsed();
    ensure(took >= Duration::from_secs(4), || format!("closed after {took:?}, before the handshake's 5 s"))
}

async fn frame_garbage(t: Target) -> Result<(), String> {
    let (side, _) = t.side().await?;
    side.send_raw(vec![0x17, 0x03, 0x03, 0x00, 0x45, 0xde, 0xad, 0xbe, 0xef]).await?;
    side.closed().await.map(drop)
}

async fn frame_too_long(t: Target) -> Result<(), String> {
    let (side, _) = t.side().await?;
    side.send_raw((64 * 1024 + 1u32).to_le_bytes().to_vec()).await?;
    side.closed().await.map(drop)
}

async fn frame_no_kind(t: Target) -> Result<(), String> {
    let (side, _) = t.side().await?;
    let junk = v1::HelloResponse { version: 9, side_channel: "x".into(), ticket: Bytes::new() }.encode_to_vec();
    let mut framed = (junk.len() as u32).to_le_bytes().to_vec();
    framed.extend_from_slice(&junk);
    side.send_raw(framed).await?;
    side.closed().await.map(drop)
}

async fn frame_descriptor_mid_frame(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    // A registration without a descriptor (answered with an error) and, in the same write, the first bytes of a
    // second frame; once the answer is in, the server has read those bytes too.
    let mut bytes = Vec::new();
    wire::encode_frame(&wire::frame(Kind::Register(v1::Register { segment: 1, len: 1, source: None })), &mut bytes);
    let mut next = Vec::new();
    wire::encode_frame(
        &wire::frame(Kind::Register(v1::Register { segment: 2, len: 1 << 20, source: None })),
        &mut next,
    );
    bytes.extend_from_slice(&next[..3]);
    s.side.send_raw(bytes).await?;
    s.wait("Registered", |seen| seen.registered.get(&1).map(drop)).await?;
    // The descriptor rides with bytes from the middle of that frame: no frame starts in them.
    let fd = sealed_memfd(1 << 20, &[])?;
    let sock = s.side.0.clone();
    crate::peer::blocking(move || {
        use std::os::fd::AsFd;
        shmgrpc::fdpass::send_with_fds(&*sock, &next[3..next.len() - 1], &[fd.as_fd()])
    })
    .await
    .map_err(|e| e.to_string())?;
    s.closed().await.map(drop)
}

async fn frame_unexpected_kind(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    s.side.send(Kind::Welcome(v1::Welcome { session: vec![0; 16].into(), threshold: 0 })).await?;
    s.closed().await.map(drop)
}

/// Sends `kind` framed, with `fds` riding on its first byte.
async fn send_with(s: &Session, kind: Kind, fds: Vec<std::os::fd::OwnedFd>) -> Result<(), String> {
    let mut bytes = Vec::new();
    wire::encode_frame(&wire::frame(kind), &mut bytes);
    let sock = s.side.0.clone();
    crate::peer::blocking(move || {
        use std::os::fd::AsFd;
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let n = shmgrpc::fdpass::send_with_fds(&*sock, &bytes, &borrowed)?;
        std::io::Write::write_all(&mut &*sock, &bytes[n..])
    })
    .await
    .map_err(|e| e.to_string())
}

async fn frame_two_descriptors(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    let fds = vec![sealed_memfd(4096, b"")?, sealed_memfd(4096, b"")?];
    send_with(&s, Kind::Register(v1::Register { segment: 1, len: 4096, source: None }), fds).await?;
    s.closed().await.map(drop)
}

async fn frame_descriptor_on_release(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    let fds = vec![sealed_memfd(4096, b"")?];
    send_with(&s, Kind::Release(v1::Release { segment: 1, generation: 1 }), fds).await?;
    s.closed().await.map(drop)
}

async fn response_inline_without_header(t: Target) -> Result<(), String> {
    let _s = t.session().await?; // a session exists; this call does not name it
    let req = shmgrpc_demo::DownloadRequest { size: 2 << 20, seed: 3, count: 1 }.encode_to_vec();
    let reply = t.call(DOWNLOAD, req.into(), None).await.map_err(|st| format!("the call failed: {st}"))?;
    ensure(!wire::is_reference(&reply), || "a reference in the response of a call without the header".into())?;
    let p = Payload::decode(reply).map_err(|e| format!("the reply does not decode: {e}"))?;
    shmgrpc_demo::verify(&p).map_err(|e| format!("the reply's payload: {e}"))
}

async fn call_malformed_number(t: Target) -> Result<(), String> {
    let (s, body) = with_payload(&t, 300_000).await?;
    let r = reference(&s.id, false, vec![sender(1, 1, 0, body.len() as u64)]);
    let reply = if s.version >= 4 {
        let header = format!("{}.+5", hex(&s.id));
        t.call_with(ECHO, r, None, &[(SESSION_HEADER, &header)]).await
    } else {
        t.call_with(ECHO, r, Some(&s.id), &[(CALL_HEADER, "+5")]).await
    }
    .map_err(|st| format!("the call failed: {st}"))?;
    let got = resolve(&s, &reply, &body).await?;
    same_payload(&got, &body)
}

async fn call_number_in_session_header(t: Target) -> Result<(), String> {
    let (s, body) = with_payload(&t, 300_000).await?;
    if s.version < 4 {
        return Ok(()); // version 3 numbers calls in shmgrpc-call (call.malformed-number covers it)
    }
    let r = reference(&s.id, false, vec![sender(1, 1, 0, body.len() as u64)]);
    let header = format!("{}.7", hex(&s.id));
    let reply = t.call_with(ECHO, r, None, &[(SESSION_HEADER, &header)]).await.map_err(|st| format!("{st}"))?;
    ensure(wire::is_reference(&reply), || {
        "the call was not taken as the session's: its large reply came inline".into()
    })?;
    let got = resolve(&s, &reply, &body).await?;
    same_payload(&got, &body)
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

async fn register_answer(
    fd: Option<std::os::fd::OwnedFd>,
    len: u64,
    source: Option<v1::register::Source>,
    t: Target,
) -> Result<String, String> {
    let s = t.session().await?;
    s.register(1, len, source, fd).await
}

async fn register_memfd(t: Target) -> Result<(), String> {
    let e = register_answer(Some(sealed_memfd(1 << 20, b"x")?), 1 << 20, None, t).await?;
    ensure(e.is_empty(), || format!("refused: {e}"))
}

async fn register_unsealed(t: Target) -> Result<(), String> {
    let e = register_answer(Some(memfd(1 << 20, b"x")?), 1 << 20, None, t).await?;
    ensure(!e.is_empty(), || "an unsealed memfd was accepted".into())
}

async fn register_short(t: Target) -> Result<(), String> {
    let e = register_answer(Some(sealed_memfd(1 << 20, b"x")?), 2 << 20, None, t).await?;
    ensure(!e.is_empty(), || "a memfd shorter than len was accepted".into())
}

async fn register_no_source(t: Target) -> Result<(), String> {
    let e = register_answer(None, 4096, None, t).await?;
    ensure(!e.is_empty(), || "a registration of nothing was accepted".into())
}

async fn register_two_sources(t: Target) -> Result<(), String> {
    let name = Some(v1::register::Source::PosixName("/shmgrpc-1-0123456789abcdef".into()));
    let e = register_answer(Some(sealed_memfd(4096, b"x")?), 4096, name, t).await?;
    ensure(!e.is_empty(), || "a descriptor and a name at once were accepted".into())
}

async fn register_not_memfd(t: Target) -> Result<(), String> {
    let (r, _w) = rustix::pipe::pipe().map_err(|e| e.to_string())?;
    let e = register_answer(Some(r), 1, None, t).await?;
    ensure(!e.is_empty(), || "a pipe was accepted".into())
}

async fn register_foreign_name(t: Target) -> Result<(), String> {
    let name = Some(v1::register::Source::PosixName("/shmgrpc-1-0123456789abcdef".into()));
    let e = register_answer(None, 4096, name, t).await?;
    ensure(!e.is_empty(), || "a POSIX name of pid 1 was accepted".into())
}

async fn register_duplicate(t: Target) -> Result<(), String> {
    let (s, body) = with_payload(&t, 4096).await?;
    let e = s.register(1, 1 << 20, None, Some(sealed_memfd(1 << 20, b"other")?)).await?;
    ensure(!e.is_empty(), || "a second registration of id 1 was accepted".into())?;
    let reply = t.call(ECHO, reference(&s.id, false, vec![sender(1, 1, 0, body.len() as u64)]), Some(&s.id)).await;
    let reply = reply.map_err(|st| format!("the first mapping is gone: {st}"))?;
    let got = resolve(&s, &reply, &body).await?;
    same_payload(&got, &body).map_err(|e| format!("{e} (the first segment's bytes)"))
}

async fn forget_final(t: Target) -> Result<(), String> {
    let (s, body) = with_payload(&t, 4096).await?;
    s.side.send(Kind::Forget(v1::Forget { segment: 1 })).await?;
    let e = s.register(1, 1 << 20, None, Some(sealed_memfd(1 << 20, &body)?)).await?;
    ensure(!e.is_empty(), || "a forgotten id was registered again".into())?;
    let start = Instant::now();
    let r = t.call(ECHO, reference(&s.id, false, vec![sender(1, 1, 0, body.len() as u64)]), Some(&s.id)).await;
    code_is(r, tonic::Code::InvalidArgument)?;
    let took = start.elapsed();
    ensure(took < Duration::from_millis(1500), || format!("held back for {took:?} instead of failing at once"))
}

async fn reference_echo(t: Target) -> Result<(), String> {
    let (s, body) = with_payload(&t, 300_000).await?;
    let r = reference(&s.id, false, vec![sender(1, 1, 0, body.len() as u64)]);
    let reply = t.call(ECHO, r, Some(&s.id)).await.map_err(|st| format!("the call failed: {st}"))?;
    let got = resolve(&s, &reply, &body).await?;
    let p = Payload::decode(got.as_slice()).map_err(|e| format!("the reply does not decode: {e}"))?;
    shmgrpc_demo::verify(&p).map_err(|e| format!("the reply's payload: {e}"))?;
    same_payload(&got, &body)
}

async fn release_after_read(t: Target) -> Result<(), String> {
    let (s, body) = with_payload(&t, 300_000).await?;
    let r = reference(&s.id, false, vec![sender(1, 42, 0, body.len() as u64)]);
    let reply = t.call(UPLOAD, r, Some(&s.id)).await.map_err(|st| format!("the call failed: {st}"))?;
    let digest = shmgrpc_demo::Digest::decode(resolve(&s, &reply, &body).await?.as_slice())
        .map_err(|e| format!("the reply does not decode: {e}"))?;
    ensure(digest.len == 300_000, || format!("the server read {} bytes", digest.len))?;
    s.wait("Release of the request's buffer", |seen| seen.releases.contains(&(1, 42)).then_some(())).await?;
    // An echo: our region comes back as a receiver part; once we answer Returned, the server lets go of it.
    let r = reference(&s.id, false, vec![sender(1, 43, 0, body.len() as u64)]);
    let reply = t.call(ECHO, r, Some(&s.id)).await.map_err(|st| format!("the call failed: {st}"))?;
    resolve(&s, &reply, &body).await?;
    s.wait("Release of the echoed buffer", |seen| seen.releases.contains(&(1, 43)).then_some(())).await
}

async fn reference_held_back(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    let body = shmgrpc_demo::payload(100_000, 3).encode_to_vec();
    let r = reference(&s.id, false, vec![sender(5, 1, 0, body.len() as u64)]);
    let (t2, id) = (t.clone(), s.id);
    let call = tokio::spawn(async move { t2.call(ECHO, r, Some(&id)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = s.register(5, 1 << 20, None, Some(sealed_memfd(1 << 20, &body)?)).await?;
    ensure(e.is_empty(), || format!("refused: {e}"))?;
    let reply = call.await.map_err(|e| e.to_string())?.map_err(|st| format!("the held-back call failed: {st}"))?;
    let got = resolve_in(&s, &reply, 5, &body).await?;
    same_payload(&got, &body)
}

async fn register_segment_cap(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    let fd = sealed_memfd(4096, b"")?;
    let mut refused_at = None;
    for id in 1..=5000u32 {
        let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0).map_err(|e| e.to_string())?;
        if !s.register(id, 4096, None, Some(dup)).await?.is_empty() {
            refused_at = Some(id);
            break;
        }
    }
    let at = refused_at.ok_or("5 000 segments were all accepted")?;
    ensure(at > 16, || format!("refused the {at}th segment already"))?;
    // Still a session: the next answer comes.
    s.register(1, 4096, None, Some(sealed_memfd(4096, b"")?)).await.map(drop)
}

async fn register_bytes_cap(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    // Sparse: it costs no memory, only the receiver's caps.
    let big = sealed_memfd((64 << 30) + 4096, b"")?;
    let e = s.register(1, 4096, None, Some(big)).await?;
    ensure(!e.is_empty(), || "a segment of 64 GiB and a page was accepted".into())?;
    let e = s.register(2, 4096, None, Some(sealed_memfd(4096, b"")?)).await?;
    ensure(e.is_empty(), || format!("a small segment after it was refused: {e}"))
}

async fn reference_closed_while_held(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    let r = reference(&s.id, false, vec![sender(7, 1, 0, 16)]);
    let (t2, id) = (t.clone(), s.id);
    let call = tokio::spawn(async move { t2.call(ECHO, r, Some(&id)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = s.side.0.shutdown(std::net::Shutdown::Both);
    let got = call.await.map_err(|e| e.to_string())?;
    code_is(got, tonic::Code::FailedPrecondition)
}

async fn reference_unregistered(t: Target) -> Result<(), String> {
    let s = t.session().await?;
    let start = Instant::now();
    code_is(
        t.call(ECHO, reference(&s.id, false, vec![sender(999, 1, 0, 16)]), Some(&s.id)).await,
        tonic::Code::InvalidArgument,
    )?;
    let took = start.elapsed();
    ensure(took < Duration::from_secs(4), || format!("held back for {took:?}, past the 2 s bound"))
}

async fn bad(t: Target, make: impl FnOnce(&[u8; 16]) -> Bytes, want: tonic::Code) -> Result<(), String> {
    let (s, _) = with_payload(&t, 4096).await?;
    code_is(t.call(ECHO, make(&s.id), Some(&s.id)).await, want)
}

async fn reference_malformed(t: Target) -> Result<(), String> {
    bad(t, |_| Bytes::from_static(b"\xfa\xe1\x09\x05ab"), tonic::Code::InvalidArgument).await
}

async fn reference_unknown_session(t: Target) -> Result<(), String> {
    bad(t, |_| reference(&[1; 16], false, vec![sender(1, 1, 0, 16)]), tonic::Code::FailedPrecondition).await
}

async fn reference_from_server(t: Target) -> Result<(), String> {
    bad(t, |id| reference(id, true, vec![sender(1, 1, 0, 16)]), tonic::Code::FailedPrecondition).await
}

async fn reference_no_parts(t: Target) -> Result<(), String> {
    bad(t, |id| reference(id, false, vec![]), tonic::Code::InvalidArgument).await
}

async fn reference_too_many_parts(t: Target) -> Result<(), String> {
    bad(t, |id| reference(id, false, vec![inline(b"x"); 65]), tonic::Code::InvalidArgument).await
}

async fn reference_part_without_kind(t: Target) -> Result<(), String> {
    bad(t, |id| reference(id, false, vec![v1::Part { kind: None }]), tonic::Code::InvalidArgument).await
}

async fn reference_too_much_inline(t: Target) -> Result<(), String> {
    bad(t, |id| reference(id, false, vec![inline(&[b'x'; 33_000])]), tonic::Code::InvalidArgument).await
}

async fn reference_out_of_range(t: Target) -> Result<(), String> {
    bad(t, |id| reference(id, false, vec![sender(1, 1, (1 << 20) - 8, 16)]), tonic::Code::OutOfRange).await
}

async fn reference_offset_overflow(t: Target) -> Result<(), String> {
    bad(t, |id| reference(id, false, vec![sender(1, 1, u64::MAX - 8, 16)]), tonic::Code::OutOfRange).await
}

async fn reference_receiver_not_held(t: Target) -> Result<(), String> {
    bad(t, |id| reference(id, false, vec![receiver(1, 77, 0, 8)]), tonic::Code::InvalidArgument).await
}

async fn reference_trailing_field(t: Target) -> Result<(), String> {
    bad(
        t,
        |id| {
            let mut r = reference(id, false, vec![sender(1, 1, 0, 16)]).to_vec();
            r.extend_from_slice(b"\x08\x01");
            r.into()
        },
        tonic::Code::InvalidArgument,
    )
    .await
}

async fn reference_not_canonical(t: Target) -> Result<(), String> {
    bad(
        t,
        |id| {
            // The same reference with its length written as a varint one byte longer than needed.
            let r = reference(id, false, vec![sender(1, 1, 0, 16)]);
            let body = &r[4..]; // key (3 bytes), then a 1-byte length: the bodies here are short
            let mut out = r[..3].to_vec();
            out.push(0x80 | (body.len() as u8 & 0x7f));
            out.push((body.len() >> 7) as u8);
            out.extend_from_slice(body);
            out.into()
        },
        tonic::Code::InvalidArgument,
    )
    .await
}

async fn reference_does_not_decode(t: Target) -> Result<(), String> {
    // 16 bytes of the segment: the start of a Payload of 4 096 bytes, which does not decode from 16.
    bad(t, |id| reference(id, false, vec![sender(1, 1, 0, 16)]), tonic::Code::InvalidArgument).await
}

async fn inline_does_not_decode(t: Target) -> Result<(), String> {
    bad(t, |_| Bytes::from_static(b"\x0a\xff\x01"), tonic::Code::InvalidArgument).await
}

async fn release_bogus_ignored(t: Target) -> Result<(), String> {
    let (s, body) = with_payload(&t, 4096).await?;
    let sock = s.side.0.clone();
    crate::peer::blocking(move || {
        for i in 0..20_000u32 {
            let kind = if i % 2 == 0 {
                Kind::Release(v1::Release { segment: i, generation: i })
            } else {
                Kind::Returned(v1::Returned { segment: i, generation: 0 })
            };
            wire::write_frame(&sock, &wire::frame(kind), None)?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|e| e.to_string())?;
    let reply = t.call(ECHO, reference(&s.id, false, vec![sender(1, 1, 0, body.len() as u64)]), Some(&s.id)).await;
    let got = resolve(&s, &reply.map_err(|st| format!("the session did not survive: {st}"))?, &body).await?;
    same_payload(&got, &body)
}

async fn server_still_serves(t: Target) -> Result<(), String> {
    reference_echo(t).await
}
