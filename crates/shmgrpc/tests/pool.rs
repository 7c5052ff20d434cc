//! The pool: best fit, growth, budget (wait, fail, eviction), release, lending, exact statistics, concurrency.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use shmgrpc::pool::{ClassStats, OnExhausted};
use shmgrpc::{Error, Pool, PoolConfig};

const K: usize = 1024;

fn small(budget: u64, policy: OnExhausted) -> Pool {
    Pool::new(PoolConfig::default().classes([64 * K, 128 * K, 256 * K]).budget(budget).on_exhausted(policy)).unwrap()
}

fn class(p: &Pool, size: usize) -> ClassStats {
    p.stats().classes.into_iter().find(|c| c.size == Some(size)).unwrap()
}

#[test]
fn defaults_cover_64k_to_1g() {
    let p = Pool::new(PoolConfig::default()).unwrap();
    let sizes: Vec<_> = p.stats().classes.iter().map(|c| c.size).collect();
    assert_eq!(sizes.first(), Some(&Some(64 * K)));
    assert_eq!(sizes[sizes.len() - 2], Some(1024 * 1024 * K));
    assert_eq!(sizes.last(), Some(&None), "the last class is the oversize class");
}

#[test]
fn best_fit_picks_the_smallest_class_that_fits() {
    let p = small(1 << 30, OnExhausted::Fail);
    let a = p.try_alloc(1).unwrap();
    let b = p.try_alloc(64 * K).unwrap();
    let c = p.try_alloc(64 * K + 1).unwrap();
    let d = p.try_alloc(200 * K).unwrap();
    let e = p.try_alloc(300 * K).unwrap();
    assert_eq!((a.len(), a.capacity()), (1, 64 * K));
    assert_eq!(b.capacity(), 64 * K);
    assert_eq!(c.capacity(), 128 * K);
    assert_eq!(d.capacity(), 256 * K);
    assert_eq!(e.capacity(), 300 * K, "above the largest class: a page-rounded buffer of its own");
    let s = p.stats();
    assert_eq!(s.classes.last().unwrap().total, 1);
    assert_eq!(s.in_use_bytes, (64 + 64 + 128 + 256 + 300) as u64 * K as u64);
}

#[test]
fn classes_are_rounded_sorted_and_validated() {
    let p = Pool::new(PoolConfig::default().classes([10_000, 4096, 10_000])).unwrap();
    let got: Vec<_> = p.stats().classes.iter().map(|c| c.size).collect();
    assert_eq!(got, vec![Some(4096), Some(12288), None]);
    assert!(Pool::new(PoolConfig::default().classes([])).is_err());
    assert!(Pool::new(PoolConfig::default().classes([0])).is_err());
    assert!(Pool::new(PoolConfig::default().budget(0)).is_err());
}

#[test]
fn growth_reuse_and_exact_stats() {
    let p = small(1 << 30, OnExhausted::Fail);
    p.preallocate(100 * K, 2).unwrap();
    assert_eq!(
        class(&p, 128 * K),
        ClassStats { size: Some(128 * K), total: 2, free: 2, in_use: 0, bytes: 256 * K as u64, in_use_bytes: 0 }
    );
    let a = p.try_alloc(128 * K).unwrap();
    let b = p.try_alloc(128 * K).unwrap();
    let c = p.try_alloc(128 * K).unwrap(); // grows
    assert_eq!(
        class(&p, 128 * K),
        ClassStats {
            size: Some(128 * K),
            total: 3,
            free: 0,
            in_use: 3,
            bytes: 384 * K as u64,
            in_use_bytes: 384 * K as u64
        }
    );
    let (id, generation) = (c.id(), c.generation());
    drop(c);
    let c2 = p.try_alloc(128 * K).unwrap();
    assert_eq!(c2.id(), id, "the released buffer is reused");
    assert_eq!(c2.generation(), generation.wrapping_add(1));
    drop((a, b, c2));
    let s = p.stats();
    assert!(s.is_idle());
    assert_eq!((s.allocs, s.grows, s.bytes, s.in_use_bytes), (4, 1, 384 * K as u64, 0));
    assert_eq!(class(&p, 128 * K).free, 3);
    p.trim();
    assert_eq!(p.stats().bytes, 0);
}

#[test]
fn leases_hold_what_was_written_and_return_on_drop_or_release() {
    let p = small(1 << 30, OnExhausted::Fail);
    let mut l = p.try_alloc(100 * K).unwrap();
    l.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
    assert!(l.iter().enumerate().all(|(i, &b)| b == i as u8));
    l.set_len(128 * K).unwrap();
    assert!(l.set_len(128 * K + 1).is_err());
    drop(l);
    assert!(p.stats().is_idle());
}

#[test]
fn budget_fail_policy_fails_at_once_and_counts() {
    let p = small(256 * K as u64, OnExhausted::Fail);
    let a = p.try_alloc(128 * K).unwrap();
    let b = p.try_alloc(128 * K).unwrap();
    match p.try_alloc(64 * K) {
        Err(Error::Exhausted { requested, in_use, budget }) => {
            assert_eq!((requested, in_use, budget), (64 * K as u64, 256 * K as u64, 256 * K as u64));
        }
        other => panic!("{other:?}"),
    }
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    assert!(matches!(rt.block_on(p.alloc(64 * K)), Err(Error::Exhausted { .. })));
    assert_eq!(p.stats().exhausted, 2);
    assert!(p.try_alloc(1 << 30).is_err(), "larger than the whole budget");
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_wait_policy_waits_for_a_release() {
    let p = small(256 * K as u64, OnExhausted::Wait);
    let a = p.alloc(128 * K).await.unwrap();
    let b = p.alloc(128 * K).await.unwrap();
    let p2 = p.clone();
    let waiter = tokio::spawn(async move { p2.alloc(128 * K).await.map(|l| l.id()) });
    while p.stats().waits == 0 {
        tokio::task::yield_now().await; // until the waiter has found the budget used up
    }
    assert!(!waiter.is_finished(), "allocation should wait while the budget is used up");
    let id = a.id();
    drop(a);
    let got = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap().unwrap();
    assert_eq!(got, id, "the waiter gets the released buffer");
    assert!(p.stats().waits >= 1);
    drop(b);
    assert!(p.stats().is_idle());
}

#[test]
fn idle_buffers_of_other_classes_are_evicted_to_make_room() {
    let p = small(256 * K as u64, OnExhausted::Fail);
    drop((p.try_alloc(64 * K).unwrap(), p.try_alloc(64 * K).unwrap(), p.try_alloc(128 * K).unwrap()));
    assert_eq!(p.stats().bytes, 256 * K as u64);
    let big = p.try_alloc(256 * K).unwrap();
    let s = p.stats();
    assert_eq!((s.evictions, s.bytes, s.in_use_bytes), (3, 256 * K as u64, 256 * K as u64));
    drop(big);
}

#[test]
fn concurrent_alloc_and_release_keep_contents_and_accounting() {
    let p = small(2 << 20, OnExhausted::Wait);
    let rt = Arc::new(tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let (p, rt) = (p.clone(), rt.clone());
            std::thread::spawn(move || {
                for i in 0..200usize {
                    let size = [1, 64 * K, 100 * K, 256 * K, 300 * K][(i + t as usize) % 5];
                    let mut l = rt.block_on(p.alloc(size)).unwrap();
                    let tag = t.wrapping_mul(37).wrapping_add(i as u8);
                    l.fill(tag);
                    std::thread::yield_now();
                    assert!(l.iter().all(|&b| b == tag), "buffer shared between two leases");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = p.stats();
    assert!(s.is_idle(), "{s}");
    assert!(s.bytes <= s.budget);
    assert_eq!(s.allocs, 1600);
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Free(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![(1usize..400 * K).prop_map(Op::Alloc), any::<usize>().prop_map(Op::Free),]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Against a model: in-use bytes are the live leases' capacities, totals never pass the budget, and
    /// everything comes back.
    #[test]
    fn accounting_matches_a_model(ops in proptest::collection::vec(op(), 1..40)) {
        let p = small(1 << 20, OnExhausted::Fail);
        let mut live = Vec::new();
        for op in ops {
            match op {
                Op::Alloc(n) => match p.try_alloc(n) {
                    Ok(l) => { prop_assert!(l.capacity() >= n); live.push(l) }
                    Err(Error::Exhausted { .. } | Error::InvalidArgument(_)) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                },
                Op::Free(i) if !live.is_empty() => { let n = live.len(); live.swap_remove(i % n); }
                _ => {}
            }
            let s = p.stats();
            let want: u64 = live.iter().map(|l| l.capacity() as u64).sum::<u64>();
            prop_assert_eq!(s.in_use_bytes, want);
            prop_assert!(s.bytes <= s.budget);
            prop_assert_eq!(s.classes.iter().map(|c| c.in_use).sum::<usize>(), live.len());
        }
        drop(live);
        prop_assert!(p.stats().is_idle());
    }
}

#[test]
fn alloc_blocking_waits_for_a_release_and_times_out_without_one() {
    let p = small(128 * K as u64, OnExhausted::Fail);
    let held = p.try_alloc(128 * K).unwrap();
    let t = std::time::Instant::now();
    assert!(matches!(p.alloc_blocking(64 * K, Duration::from_millis(50)), Err(Error::Exhausted { .. })));
    assert!(t.elapsed() >= Duration::from_millis(50));
    let p2 = p.clone();
    let releaser = std::thread::spawn(move || {
        // Once the allocation below is waiting (its second wait), not after a guessed delay.
        while p2.stats().waits < 2 {
            std::thread::yield_now();
        }
        drop(held);
        p2
    });
    let got = p.alloc_blocking(64 * K, Duration::from_secs(10)).unwrap();
    assert_eq!(got.capacity(), 64 * K, "the idle 128 KiB buffer was evicted to make room");
    releaser.join().unwrap();
    assert!(p.stats().waits >= 2);
}

#[test]
fn small_buffers_are_slots_of_one_slab_segment() {
    let p = Pool::new(PoolConfig::default().slabs(4 << 20, 1 << 20)).unwrap();
    let mut leases: Vec<_> = (0..16).map(|_| p.try_alloc(64 * K).unwrap()).collect();
    // One segment, sixteen disjoint slots, sixteen distinct (segment, generation) names.
    assert!(leases.iter().all(|l| l.id() == leases[0].id() && l.segment_len() == 1 << 20));
    let mut offsets: Vec<_> = leases.iter().map(|l| l.offset()).collect();
    offsets.sort();
    assert_eq!(offsets, (0..16).map(|i| i * 64 * K).collect::<Vec<_>>());
    let mut generations: Vec<_> = leases.iter().map(|l| l.generation()).collect();
    generations.sort();
    generations.dedup();
    assert_eq!(generations.len(), 16);
    for (i, l) in leases.iter_mut().enumerate() {
        l.fill(i as u8);
    }
    for (i, l) in leases.iter().enumerate() {
        assert!(l.iter().all(|&b| b == i as u8), "slot {i} was written by another lease");
    }
    // The seventeenth needs a second slab.
    let extra = p.try_alloc(64 * K).unwrap();
    assert_ne!(extra.id(), leases[0].id());
    // A peer maps the whole slab and finds each buffer at its offset.
    let handle = leases[5].share().unwrap();
    let peer = shmgrpc::PeerSegment::open(handle, 1 << 20).unwrap();
    let o = leases[5].offset() as u64;
    assert!(peer.range(o, 64 * K as u64).unwrap().iter().all(|&b| b == 5));
    // A reused slot gets a generation no lease of that slab had before.
    let old = generations.clone();
    drop(leases.pop());
    let again = p.try_alloc(64 * K).unwrap();
    assert_eq!(again.id(), leases[0].id());
    assert!(!old.contains(&again.generation()));
}

#[test]
fn a_slab_is_dropped_only_when_every_slot_is_idle() {
    // Two 64 KiB slots per slab, a budget of three slots.
    let p = Pool::new(
        PoolConfig::default()
            .classes([64 * K, 128 * K])
            .budget(192 * K as u64)
            .on_exhausted(OnExhausted::Fail)
            .slabs(64 * K, 128 * K),
    )
    .unwrap();
    let a = p.try_alloc(64 * K).unwrap();
    let b = p.try_alloc(64 * K).unwrap();
    assert_eq!(a.id(), b.id());
    drop(b);
    // 128 KiB more needs an eviction, but the slab still has a slot in use: nothing can go.
    assert!(matches!(p.try_alloc(128 * K), Err(Error::Exhausted { .. })));
    assert_eq!(p.stats().evictions, 0);
    assert!(p.exists(a.id()));
    let slab = a.id();
    drop(a);
    let big = p.try_alloc(128 * K).unwrap();
    let s = p.stats();
    assert_eq!((s.evictions, s.in_use_bytes), (2, 128 * K as u64), "both slots left with their slab");
    assert!(!p.exists(slab), "the slab segment is gone");
    drop(big);
}

#[test]
fn idle_buffers_beyond_the_preallocated_floor_go_after_the_idle_period() {
    let idle = Duration::from_millis(100);
    let p = Pool::new(PoolConfig::default().budget(256 << 20).idle_release(Some(idle))).unwrap();
    p.preallocate(32 << 20, 1).unwrap(); // the floor: one buffer of its own (above the slab classes)
    let floor = p.stats().bytes;
    // Two slots of one slab, and two buffers of their own; one slot stays leased for a while.
    let kept = p.try_alloc(1 << 20).unwrap();
    let slot = p.try_alloc(1 << 20).unwrap();
    let own = [p.try_alloc(8 << 20).unwrap(), p.try_alloc(16 << 20).unwrap()];
    drop((slot, own));
    assert_eq!(p.trim_idle(), 0, "nothing has been idle for the idle period yet");
    std::thread::sleep(idle + Duration::from_millis(20)); // the idle period itself is what is tested
    let trimmed = p.trim_idle();
    // The 8 and 16 MiB buffers go; the preallocated one stays, and so does the slab with a leased slot.
    assert_eq!(trimmed, (8 << 20) + (16 << 20), "{}", p.stats());
    let s = p.stats();
    assert_eq!(s.trimmed_bytes, trimmed);
    assert_eq!(s.bytes, floor + (2 << 20), "the floor and the slab's two slots: {s}");
    drop(kept);
    std::thread::sleep(idle + Duration::from_millis(20));
    assert_eq!(p.trim_idle(), 2 << 20, "the whole slab goes once every slot of it is idle");
    assert_eq!(p.stats().bytes, floor);
    // A pool without an idle period keeps everything.
    let keep = Pool::new(PoolConfig::default().idle_release(None)).unwrap();
    drop(keep.try_alloc(1 << 20).unwrap());
    assert_eq!(keep.trim_idle(), 0);
}

/// Two tenants of one pool never get buffers of one segment (a peer given a segment can read all of it, for as
/// long as it likes), in slab classes and in classes of segments of their own; a retired tenant's segments go.
#[test]
fn a_segment_that_held_one_tenants_buffers_never_holds_anothers() {
    // 64 KiB is a slab class (slots of 64 MiB slabs); 8 MiB buffers are segments of their own.
    let p = Pool::new(PoolConfig::default()).unwrap();
    let (a, b) = (p.tenant(), p.tenant());
    for size in [64 * K, 8 * 1024 * K] {
        let la = p.try_alloc_for(a, size, 0).unwrap();
        let a_segment = la.id();
        drop(la);
        // The buffer A used is idle, and B does not get it (nor another slot of its slab).
        let lb = p.try_alloc_for(b, size, 0).unwrap();
        assert_ne!(lb.id(), a_segment, "{size}: B got a buffer in a segment A was given");
        // A gets its own back; so does an allocation without a tenant never get either.
        assert_eq!(p.try_alloc_for(a, size, 0).unwrap().id(), a_segment, "{size}: A's own idle buffer is reused");
        let plain = p.try_alloc(size).unwrap();
        assert!(plain.id() != a_segment && plain.id() != lb.id(), "{size}: an untenanted lease in a tenant's segment");
        drop((lb, plain));
    }
    // A leaves: its idle segments are dropped (their peer may still map them), B's stay.
    let before = p.stats();
    p.retire(a);
    let after = p.stats();
    assert!(after.evictions > before.evictions, "{after}");
    assert!(p.try_alloc_for(b, 64 * K, 0).is_ok());
    // A buffer of a retired tenant that was still leased goes when it comes back.
    let c = p.tenant();
    let held = p.try_alloc_for(c, 8 * 1024 * K, 0).unwrap();
    let id = held.id();
    p.retire(c);
    assert!(p.exists(id), "still leased");
    drop(held);
    assert!(!p.exists(id), "a retired tenant's buffer went back into the pool");
}
