//! The sender alone: no socket, no receiver, no peer. Frames it queues are read from its outbox; the peer's
//! answers are handed to it as the session would.

use super::*;
use crate::config::SendConfig;
use crate::pool::PoolConfig;
use crate::protocol::Side;
use crate::session::loan::NoRegions;
use crate::session::outbox::Drain;

#[derive(Clone, PartialEq, prost::Message)]
struct Blob {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

fn sender(config: SendConfig) -> (Sender, Drain) {
    let (outbox, drain) = Outbox::new(None);
    (Sender::new(config.into_params(Side::Client).unwrap(), outbox), drain)
}

fn encode(s: &Sender, len: usize) -> Result<v1::Region, Fallback> {
    let msg = Blob { data: vec![7; len] };
    let encoded = s.encode(&msg, msg.encoded_len(), &NoRegions, None)?;
    assert!(encoded.sent_back.is_empty());
    match encoded.parts.as_slice() {
        [v1::Part { kind: Some(part::Kind::Sender(r)) }] => Ok(*r),
        other => panic!("expected one sender part, got {other:?}"),
    }
}

/// The frames queued so far: (kind, whether a descriptor rides with it).
fn queued(drain: &mut Drain) -> Vec<(Kind, bool)> {
    std::iter::from_fn(|| drain.try_next()).map(|o| (o.kind, o.fd.is_some())).collect()
}

#[test]
fn a_new_segment_is_registered_once_with_its_memfd_and_every_part_is_held() {
    let (s, mut drain) = sender(SendConfig::default());
    let first = encode(&s, 1 << 20).unwrap();
    let frames = queued(&mut drain);
    assert_eq!(frames.len(), 1, "{frames:?}");
    let (Kind::Register(reg), true) = &frames[0] else { panic!("expected a Register with a memfd: {frames:?}") };
    assert_eq!(reg.segment, first.segment);
    assert!(reg.source.is_none(), "a memfd travels as a descriptor, not a name");
    assert!(first.offset + first.len <= reg.len, "the part lies inside the registered segment");
    // A second message in another slot of the same slab: no second registration.
    let second = encode(&s, 1 << 20).unwrap();
    assert_eq!(second.segment, first.segment);
    assert_ne!((second.offset, second.generation), (first.offset, first.generation));
    assert!(queued(&mut drain).is_empty(), "the segment is registered already");
    let (holds, held, registered) = s.figures();
    assert_eq!((holds, registered), (2, 1));
    assert_eq!(held, first.len + second.len);
}

#[test]
fn only_the_right_generation_releases_a_hold() {
    let (s, _drain) = sender(SendConfig::default());
    let r = encode(&s, 256 << 10).unwrap();
    let bad = || s.params.recorder.snapshot().bad_releases;
    s.on_release(r.segment, r.generation.wrapping_add(1));
    s.on_release(r.segment + 1, r.generation);
    assert_eq!((s.figures().0, bad()), (1, 2), "stale and unknown releases change nothing");
    s.on_release(r.segment, r.generation);
    assert_eq!(s.figures().0, 0);
    assert!(s.params.pool.stats().is_idle(), "the buffer went back to the pool");
    s.on_release(r.segment, r.generation);
    assert_eq!(bad(), 3, "a repeated release is refused");
}

#[test]
fn the_window_fills_with_held_bytes_and_a_release_opens_it() {
    let (s, _drain) = sender(SendConfig { window: 1 << 20, ..SendConfig::default() });
    let r = encode(&s, 1 << 20).unwrap();
    let full = || s.held() >= s.params.window;
    assert!(full());
    let woken = s.progress().clone();
    let notified = woken.notified();
    let mut notified = std::pin::pin!(notified);
    notified.as_mut().enable();
    s.on_release(r.segment, r.generation);
    assert!(!full());
    assert!(futures_util::FutureExt::now_or_never(notified).is_some(), "a release wakes window waiters");
}

#[test]
fn a_refused_segment_is_not_referred_to_again() {
    let (s, _drain) = sender(SendConfig::default());
    let r = encode(&s, 1 << 20).unwrap();
    s.on_registered(v1::Registered { segment: r.segment, error: "no".into() });
    assert_eq!(encode(&s, 1 << 20), Err(Fallback::RegistrationFailed));
    assert_eq!(s.figures().2, 0, "a refused segment does not count as registered");
    // Nothing of the failed message stays held.
    assert_eq!(s.figures().0, 1);
}

#[test]
fn an_exhausted_pool_is_a_fallback_that_marks_the_pool_short_until_a_return() {
    let pool = PoolConfig::default().budget(1 << 20).slabs(0, 0);
    let config = SendConfig { pool_config: pool, exhausted_wait: Duration::from_secs(1), ..SendConfig::default() };
    let (s, _drain) = sender(config);
    let r = encode(&s, 900 << 10).unwrap();
    assert!(!s.pool_short());
    assert_eq!(encode(&s, 900 << 10), Err(Fallback::PoolExhausted));
    assert!(s.pool_short(), "the next call may wait for a return");
    s.on_release(r.segment, r.generation);
    assert!(!s.pool_short(), "a buffer came back");
}

#[test]
fn a_peer_holding_much_leaves_the_last_quarter_of_a_shared_pool_to_the_others() {
    let pool = crate::Pool::new(PoolConfig::default().budget(16 << 20).slabs(0, 0)).unwrap();
    let config = SendConfig { pool: Some(pool.clone()), ..SendConfig::default() };
    let (hog, _d1) = sender(config.clone());
    let (light, _d2) = sender(config);
    // Two sessions share the pool (counted by the session layer, which these senders have none of).
    hog.params.sessions.store(2, Ordering::Relaxed);
    light.params.sessions.store(2, Ordering::Relaxed);
    // The hog keeps 1000 KiB messages (1 MiB buffers): once it holds a sixteenth of the budget, it gets a
    // buffer only while a quarter of the budget stays free.
    let mut kept = 0;
    let refused = loop {
        match encode(&hog, 1000 << 10) {
            Ok(_) => kept += 1,
            Err(reason) => break reason,
        }
    };
    assert_eq!(refused, Fallback::ShareExceeded);
    assert_eq!(kept, 12, "12 MiB of 16 in use, 4 left to the others");
    // A peer that releases what it is sent still has the last quarter, message after message.
    for _ in 0..8 {
        let r = encode(&light, 1000 << 10).unwrap();
        light.on_release(r.segment, r.generation);
    }
    // The hog, still holding all it kept, still gets nothing.
    assert_eq!(encode(&hog, 1000 << 10), Err(Fallback::ShareExceeded));
}

#[test]
fn a_closed_session_encodes_nothing_and_closing_gives_every_hold_back() {
    let (s, _drain) = sender(SendConfig::default());
    encode(&s, 1 << 20).unwrap();
    assert_eq!(s.close(), 1);
    assert!(s.params.pool.stats().is_idle());
    s.outbox.close();
    assert_eq!(encode(&s, 1 << 20), Err(Fallback::SessionClosed));
}
