//! A pair of sessions over a socketpair, inside one process: the two halves of each end working together through
//! the side channel (registration without a round trip, resolving a reference, holds and their releases keyed by
//! (segment, generation), refusals of stale and repeated releases, what closing gives back). No gRPC and no second
//! process. Each half alone is tested beside it (`sender/tests.rs`, `receiver/tests.rs`).

use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::SendConfig;
use crate::proto::v1::{self, part};
use crate::side_channel::{FrameReader, adopt};
use crate::wire::Reference;

/// An application message with one large `bytes` field.
#[derive(Clone, PartialEq, prost::Message)]
struct Blob {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

fn blob(len: usize) -> Blob {
    Blob { data: (0..len).map(|i| (i * 7 + 3) as u8).collect() }
}

/// Client and server ends of one session, connected by a socketpair.
fn pair() -> (Arc<Session>, Arc<Session>) {
    pair_of(crate::protocol::PROTOCOL_VERSION)
}

/// [`pair`], speaking protocol `version`.
fn pair_of(version: u32) -> (Arc<Session>, Arc<Session>) {
    let (a, b) = StdUnixStream::pair().unwrap();
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).unwrap();
    let params = |side| SendConfig::default().into_params(side).unwrap();
    let link = |socket| Link {
        socket: adopt(socket).unwrap(),
        reader: FrameReader::default(),
        peer_pid: std::process::id(),
        version,
        peer_threshold: None,
    };
    let client = Session::start(id, Side::Client, params(Side::Client), link(a)).unwrap();
    let server = Session::start(id, Side::Server, params(Side::Server), link(b)).unwrap();
    (client, server)
}

/// Waits (this is a plain test thread, not a runtime worker) until `f` holds; frames cross on the I/O thread.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The one `sender` region of a reference.
fn region(r: &Reference) -> v1::Region {
    assert_eq!(r.parts.len(), 1, "{r:?}");
    match r.parts[0].kind.as_ref() {
        Some(part::Kind::Sender(region)) => *region,
        other => panic!("expected a sender part, got {other:?}"),
    }
}

#[test]
fn a_reference_resolves_at_the_peer_and_its_release_drops_the_hold() {
    let (client, server) = pair();
    let msg = blob(1 << 20);
    let r = client.encode_to_shm(&msg, prost::Message::encoded_len(&msg), None).unwrap().0;
    assert_eq!(client.stats().holds, 1);
    // The reference was made before the peer has the segment (no round trip); the peer learns of it in order.
    eventually("the server has the segment", || !server.awaits_registration(&r));
    let Resolved { parts, segments } = server.resolve(r).unwrap();
    assert_eq!(segments.len(), 1);
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    assert_eq!(<Blob as prost::Message>::decode(&bytes[..]).unwrap(), msg);
    assert_eq!(client.stats().held_bytes, bytes.len() as u64);
    // Dropping the parts sends the release.
    drop(parts);
    eventually("the release arrived", || client.stats().holds == 0);
    assert_eq!(client.stats().held_bytes, 0);
    assert_eq!(client.recorder().snapshot().bad_releases, 0);
}

#[test]
fn stale_and_repeated_releases_are_refused_and_change_nothing() {
    let (client, server) = pair();
    let msg = blob(256 << 10);
    let r = client.encode_to_shm(&msg, prost::Message::encoded_len(&msg), None).unwrap().0;
    let v1::Region { segment, generation, .. } = region(&r);
    let release = |generation| server.send(Kind::Release(v1::Release { segment, generation }), None).unwrap();
    let refused = || client.recorder().snapshot().bad_releases;

    // Another generation of the same buffer (stale, or forged): refused, the hold stays.
    release(generation.wrapping_add(1));
    eventually("the stale release is refused", || refused() == 1);
    assert_eq!(client.stats().holds, 1);
    // A buffer the peer never held.
    server.send(Kind::Release(v1::Release { segment: segment + 1000, generation }), None).unwrap();
    eventually("the unknown release is refused", || refused() == 2);
    assert_eq!(client.stats().holds, 1);
    // The right one releases it.
    release(generation);
    eventually("the release arrived", || client.stats().holds == 0);
    // Once more: nothing is held any more, so it is refused.
    release(generation);
    eventually("the repeated release is refused", || refused() == 3);
    assert_eq!(client.recorder().snapshot().peer_refusals, 3);
    // The buffer is reused under a new generation, which the old release cannot free.
    let r2 = client.encode_to_shm(&msg, prost::Message::encoded_len(&msg), None).unwrap().0;
    let again = region(&r2);
    assert_eq!((again.segment, again.offset), (segment, region(&r).offset), "the same slot is reused");
    assert_ne!(again.generation, generation);
    release(generation);
    eventually("the old generation is refused", || refused() == 4);
    assert_eq!(client.stats().holds, 1);
    assert!(client.is_alive() && server.is_alive(), "refusals do not end the session");
}

#[test]
fn closing_gives_back_every_hold_and_mapping() {
    let (client, server) = pair();
    let msg = blob(1 << 20);
    let refs: Vec<Reference> =
        (0..3).map(|_| client.encode_to_shm(&msg, prost::Message::encoded_len(&msg), None).unwrap().0).collect();
    eventually("the server has the segment", || refs.iter().all(|r| !server.awaits_registration(r)));
    assert_eq!(client.stats().holds, 3);
    assert!(server.stats().peer_segments >= 1);
    client.close();
    assert_eq!(client.stats().holds, 0);
    assert!(client.sender.params().pool.stats().is_idle(), "{}", client.sender.params().pool.stats());
    // The server sees the end of the side channel and drops the client's mappings.
    eventually("the server session ends", || !server.is_alive());
    assert_eq!(server.stats().peer_segments, 0);
}

#[test]
fn a_message_taken_back_is_rebuilt_whole_and_holds_nothing() {
    let (client, server) = pair();
    let msg = blob(1 << 20);
    // (Whether the peer's answer to the new segment's registration has come yet depends on the I/O thread.)
    let (r, _) = client.encode_to_shm(&msg, prost::Message::encoded_len(&msg), None).unwrap();
    assert_eq!(client.stats().holds, 1);
    // The peer refuses, or the answer does not come: the message goes inline, rebuilt from our buffer.
    let bytes = client.take_back(&r).expect("the session is alive");
    assert_eq!(<Blob as prost::Message>::decode(&bytes[..]).unwrap(), msg);
    assert_eq!(client.stats().holds, 0, "a reference that never left holds nothing");
    assert!(client.sender.params().pool.stats().is_idle());
    // Once the session is closed its holds are gone: nothing can be rebuilt.
    let (r, _) = client.encode_to_shm(&msg, prost::Message::encoded_len(&msg), None).unwrap();
    client.close();
    assert!(client.take_back(&r).is_none());
    drop(server);
}

#[test]
fn a_call_end_drops_the_holds_of_the_messages_after_those_received_and_only_those() {
    let (client, server) = pair();
    let msg = blob(256 << 10);
    let len = prost::Message::encoded_len(&msg);
    client.open_call(5);
    // Call 5 sends three messages; another call one.
    let refs: Vec<Reference> = (0..3).map(|i| client.encode_to_shm(&msg, len, Some((5, i))).unwrap().0).collect();
    let other = client.encode_to_shm(&msg, len, Some((6, 0))).unwrap().0;
    assert_eq!(client.stats().holds, 4);
    // The server read the first message of call 5 only; its stream ended there.
    server.end_call(5, 1);
    eventually("the holds of the two messages never received went", || client.stats().holds == 2);
    assert_eq!(client.recorder().snapshot().lost_in_flight, 2);
    // The message received is answered as usual; so is the other call's.
    for r in [&refs[0], &other] {
        eventually("the server has the segment", || !server.awaits_registration(r));
        drop(server.resolve(r.clone()).unwrap());
    }
    eventually("the received messages' releases arrived", || client.stats().holds == 0);
    assert_eq!(client.recorder().snapshot().bad_releases, 0, "nothing was released twice");
    // A message the body sends after the peer ended the call holds nothing: it never arrives.
    let late = client.encode_to_shm(&msg, len, Some((5, 3))).unwrap().0;
    assert_eq!(client.stats().holds, 0, "{late:?}");
    client.close_call(5);
    // A `CallEnd` for a call we know nothing of, or repeated, changes nothing.
    server.end_call(5, 0);
    server.end_call(99, 0);
    let kept = client.encode_to_shm(&msg, len, Some((7, 0))).unwrap().0;
    let stale = v1::Release { segment: region(&kept).segment, generation: region(&kept).generation.wrapping_add(1) };
    server.send(Kind::Release(stale), None).unwrap();
    eventually("a later frame went through", || client.recorder().snapshot().bad_releases == 1);
    assert_eq!(client.stats().holds, 1);
    assert!(client.is_alive());
}

#[test]
fn a_calls_headers_name_its_session_and_number_as_its_version_says() {
    let of_call = |session: &str, call: Option<&str>| Session::of_call(session, call, Side::Server);
    let text = |v: &http::HeaderValue| v.to_str().unwrap().to_owned();
    for version in [4, 3, 2] {
        let (client, server) = pair_of(version);
        let hex = server.header_text().to_owned();
        let number = (version >= 3).then_some(7);
        // What the client sends, the server reads back: this session, and the call's number.
        let (session, call) = client.call_headers(number);
        let (found, n) = of_call(&text(&session), call.as_ref().map(text).as_deref()).expect("the session");
        assert!(Arc::ptr_eq(&found, &server), "version {version}");
        assert_eq!(n, number, "version {version}");
        match version {
            4 => {
                // One header: the id, a dot, the number. A shmgrpc-call header is not read.
                assert_eq!((text(&session), call), (format!("{hex}.7"), None));
                assert_eq!(of_call(&hex, Some("7")).unwrap().1, None);
                // A number that is not one leaves the call the session's, unnumbered.
                for bad in ["+5", "", "7.8", "x"] {
                    let (s, n) = of_call(&format!("{hex}.{bad}"), None).expect("still the session's");
                    assert!(Arc::ptr_eq(&s, &server) && n.is_none(), "{bad:?}");
                }
            }
            3 => {
                assert_eq!((text(&session), call.as_ref().map(text)), (hex.clone(), Some("7".to_owned())));
                assert_eq!(of_call(&hex, Some("+5")).unwrap().1, None);
                // A version 3 session header is the 32 hex digits alone.
                assert!(of_call(&format!("{hex}.7"), None).is_none());
            }
            _ => {
                // Version 2 numbers no calls.
                assert_eq!(client.call_headers(None), (session.clone(), None));
                assert_eq!(of_call(&hex, Some("7")).unwrap().1, None);
                assert!(of_call(&format!("{hex}.7"), None).is_none());
            }
        }
        // Another side's, or nobody's, session is not found.
        assert!(Session::of_call(&hex, None, Side::Client).is_some_and(|(s, _)| Arc::ptr_eq(&s, &client)));
        assert!(of_call("0123456789abcdef0123456789abcdef", None).is_none());
        if hex.bytes().any(|b| b.is_ascii_alphabetic()) {
            assert!(of_call(&hex.to_uppercase(), None).is_none(), "only lowercase hex names a session");
        }
    }
}
