//! The receiver alone: no socket, no sender, no peer. Segments are made in the test and registered as the peer
//! would; the frames the receiver queues (answers, releases, returns) are read from its outbox.

use super::*;
use crate::protocol::Side;
use crate::segment::{Backend, Segment, SegmentOptions};
use crate::session::outbox::Drain;
use tonic::Code;

fn receiver() -> (Receiver, Drain) {
    let (outbox, drain) = Outbox::new(None);
    (Receiver::new(Recorder::new(Side::Server), outbox, std::process::id()), drain)
}

/// A sealed memfd segment of `len` bytes holding `i as u8` at offset `i`.
fn segment(len: usize) -> Segment {
    let mut seg = Segment::create(len, &SegmentOptions::new(Backend::Memfd)).unwrap();
    for (i, b) in seg.as_mut_slice().iter_mut().enumerate() {
        *b = i as u8;
    }
    seg
}

/// Registers `seg` under `id` as the peer would, and returns the receiver's answer (empty: accepted).
fn register(rx: &Receiver, drain: &mut Drain, id: u32, seg: &Segment) -> String {
    let Ok(SegmentHandle::Memfd(fd)) = seg.share() else { panic!("a memfd segment shares a descriptor") };
    rx.on_register(v1::Register { segment: id, len: seg.len() as u64, source: None }, Some(fd)).unwrap();
    match drain.try_next().map(|o| o.kind) {
        Some(Kind::Registered(r)) if r.segment == id => r.error,
        other => panic!("expected Registered for {id}, got {other:?}"),
    }
}

fn reference(parts: Vec<part::Kind>) -> Reference {
    Reference {
        session: Bytes::from_static(&[0; 16]),
        from_server: false,
        parts: parts.into_iter().map(|k| v1::Part { kind: Some(k) }).collect(),
    }
}

fn sender_part(segment: u32, generation: u32, offset: u64, len: u64) -> part::Kind {
    part::Kind::Sender(v1::Region { segment, generation, offset, len })
}

fn none(_: u32, _: u32) -> Option<Arc<Outgoing>> {
    None
}

#[test]
fn a_registered_segment_resolves_in_place_and_dropping_the_bytes_releases_it() {
    let (rx, mut drain) = receiver();
    let seg = segment(1 << 20);
    assert_eq!(register(&rx, &mut drain, 5, &seg), "");
    let r = reference(vec![part::Kind::Inline(Bytes::from_static(b"head")), sender_part(5, 9, 100, 1000)]);
    assert!(!rx.awaits_registration(&r));
    let Resolved { parts, segments } = rx.resolve(r, none).unwrap();
    assert_eq!(segments.len(), 1);
    assert_eq!(&parts[0][..], b"head");
    assert_eq!(parts[1].len(), 1000);
    assert_eq!(parts[1][0], 100, "the part starts at its offset");
    assert!(rx.maps(&parts[1]), "read in place, not copied");
    assert!(drain.try_next().is_none(), "nothing is released while the bytes live");
    drop(parts);
    match drain.try_next().map(|o| o.kind) {
        Some(Kind::Release(v1::Release { segment: 5, generation: 9 })) => {}
        other => panic!("expected the release of (5, 9), got {other:?}"),
    }
}

#[test]
fn references_that_break_a_rule_get_their_status_and_hold_nothing() {
    let (rx, mut drain) = receiver();
    let seg = segment(64 << 10);
    assert_eq!(register(&rx, &mut drain, 1, &seg), "");
    let cases: Vec<(&str, Vec<part::Kind>, Code)> = vec![
        ("no parts", vec![], Code::InvalidArgument),
        ("too many parts", vec![part::Kind::Inline(Bytes::new()); MAX_PARTS + 1], Code::InvalidArgument),
        ("too much inline", vec![part::Kind::Inline(vec![0; MAX_INLINE + 1].into())], Code::InvalidArgument),
        ("unknown segment", vec![sender_part(2, 0, 0, 1)], Code::InvalidArgument),
        ("past the end", vec![sender_part(1, 0, 64 << 10, 1)], Code::OutOfRange),
        ("overflowing range", vec![sender_part(1, 0, u64::MAX, 2)], Code::OutOfRange),
        (
            "a buffer of ours the peer does not hold",
            vec![part::Kind::Receiver(v1::Region::default())],
            Code::InvalidArgument,
        ),
    ];
    for (what, parts, code) in cases {
        let err = rx.resolve(reference(parts), none).err().unwrap_or_else(|| panic!("{what}: resolved"));
        assert_eq!(err.code(), code, "{what}: {err}");
    }
    assert!(drain.try_next().is_none(), "no release or return for a refused reference");
}

#[test]
fn bad_registrations_are_answered_with_an_error_and_are_not_awaited() {
    let (rx, mut drain) = receiver();
    let seg = segment(64 << 10);
    assert_eq!(register(&rx, &mut drain, 1, &seg), "");
    assert!(register(&rx, &mut drain, 1, &seg).contains("already registered"));
    // Longer than the segment really is.
    let Ok(SegmentHandle::Memfd(fd)) = seg.share() else { unreachable!() };
    rx.on_register(v1::Register { segment: 2, len: 1 << 30, source: None }, Some(fd)).unwrap();
    let Some(Kind::Registered(r)) = drain.try_next().map(|o| o.kind) else { panic!("no answer") };
    assert!(!r.error.is_empty());
    // Neither a descriptor nor a name.
    rx.on_register(v1::Register { segment: 3, len: 1, source: None }, None).unwrap();
    let Some(Kind::Registered(r)) = drain.try_next().map(|o| o.kind) else { panic!("no answer") };
    assert!(!r.error.is_empty());
    // A reference to a refused segment is not held back: it fails at once.
    assert!(!rx.awaits_registration(&reference(vec![sender_part(2, 0, 0, 1)])));
    assert!(rx.awaits_registration(&reference(vec![sender_part(4, 0, 0, 1)])), "4 may still come");
    assert_eq!(rx.recorder.snapshot().peer_refusals, 3);
}

#[test]
fn returns_of_regions_never_sent_back_are_refused_and_forget_unmaps() {
    let (rx, mut drain) = receiver();
    let seg = segment(64 << 10);
    assert_eq!(register(&rx, &mut drain, 1, &seg), "");
    rx.on_returned(1, 0);
    assert_eq!(rx.recorder.snapshot().bad_releases, 1);
    assert_eq!(rx.mapped(), (1, seg.len() as u64));
    rx.on_forget(1);
    assert_eq!(rx.mapped(), (0, 0));
    let forgotten = reference(vec![sender_part(1, 0, 0, 1)]);
    assert!(!rx.awaits_registration(&forgotten), "a forgotten segment is not waited for");
    let err = rx.resolve(forgotten, none).err().unwrap();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // Its id does not come back (protocol §5).
    assert!(register(&rx, &mut drain, 1, &seg).contains("forgotten"));
    assert_eq!(rx.mapped(), (0, 0));
}

/// A sealed, sparse memfd of `len` bytes (no memory used) and the receiver's answer to its registration.
fn register_sparse(rx: &Receiver, drain: &mut Drain, id: u32, len: u64) -> String {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create("sparse", MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
    rx.on_register(v1::Register { segment: id, len, source: None }, Some(fd)).unwrap();
    match drain.try_next().map(|o| o.kind) {
        Some(Kind::Registered(r)) => r.error,
        other => panic!("expected Registered, got {other:?}"),
    }
}

#[test]
fn one_peer_process_gets_a_share_of_the_process_cap_whatever_its_sessions() {
    // Pids this high are never real (the kernel's limit is 2^22), so no other test counts against them.
    let peer = 0x7fff_0000;
    let of = |pid| {
        let (outbox, drain) = Outbox::new(None);
        (Receiver::new(Recorder::new(Side::Server), outbox, pid), drain)
    };
    let mut sessions: Vec<(Receiver, Drain)> = (0..5).map(|_| of(peer)).collect();
    let answers: Vec<String> =
        sessions.iter_mut().map(|(rx, d)| register_sparse(rx, d, 1, MAX_SESSION_PEER_BYTES)).collect();
    let share = (MAX_PEER_BYTES / MAX_SESSION_PEER_BYTES) as usize;
    assert!(answers[..share].iter().all(String::is_empty), "{answers:?}");
    assert!(answers[share].contains("one peer may"), "{answers:?}");
    // Another peer process is not held back by the first one's sessions.
    let (other, mut d) = of(peer + 1);
    assert_eq!(register_sparse(&other, &mut d, 1, MAX_SESSION_PEER_BYTES), "");
    // A session that ends gives its part of the share back.
    sessions[0].0.close();
    let (again, mut d) = of(peer);
    assert_eq!(register_sparse(&again, &mut d, 1, MAX_SESSION_PEER_BYTES), "");
    for (rx, _) in &sessions {
        rx.close();
    }
    other.close();
    again.close();
}

#[test]
fn closing_drops_every_mapping_and_stops_waiting() {
    let (rx, mut drain) = receiver();
    let seg = segment(64 << 10);
    assert_eq!(register(&rx, &mut drain, 1, &seg), "");
    let r = reference(vec![sender_part(7, 0, 0, 1)]);
    assert!(rx.awaits_registration(&r));
    rx.outbox.close();
    rx.close();
    assert_eq!(rx.mapped(), (0, 0));
    assert!(!rx.awaits_registration(&r), "nothing is held back once the session is closed");
}
