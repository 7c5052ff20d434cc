//! Large copies of payload bytes, split across a few short-lived helper threads when the process has cores to
//! spare.
//!
//! One core copies a payload that does not fit the caches at its own memory bandwidth: on the 2-core development
//! machine, 20 MiB into a warm pool buffer take 1.37 ms on one thread and 0.71 ms on two (criterion; see
//! docs/performance.md, "Parallel copies"). The copies a payload cannot avoid (a transparent message into a pool
//! buffer, a loan filled from an existing buffer, a received message copied out) go through [`copy`], or
//! [`Writer`] for a message encoded into a pool buffer. A copy of at least [`PARALLEL_MIN`] bytes is cut into chunks
//! that the caller and up to [`MAX_HELPERS`] scoped helper threads take in turn.
//!
//! Helpers come from one budget for the whole process: at most one per spare core (`available_parallelism - 1`,
//! and at most [`MAX_HELPERS`]) exist at any time, whatever the number of sessions, calls or copies; a copy that
//! finds the budget spent runs on its caller's thread alone, as does every copy on a one-core machine or after
//! [`set_helpers`]`(0)`. A helper that cannot be started leaves its share to the others.
//!
//! The environment variable [`HELPERS_ENV`] (`SHMGRPC_COPY_THREADS`) sets the budget when the process first
//! copies, for programs that cannot call [`set_helpers`] (the `shmgrpc` command, Python): `0` keeps every copy on
//! its caller's thread, on a machine whose cores are better spent on other requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use bytes::{Buf, BufMut};

/// Copies shorter than this run on the caller's thread alone (the caches make them fast, and a thread's start
/// costs tens of microseconds).
pub const PARALLEL_MIN: usize = 16 << 20;

/// The most helper threads one copy uses (and the default budget's cap).
pub const MAX_HELPERS: usize = 3;

/// The environment variable that sets the process's budget of helper threads (a count; see the module docs).
pub const HELPERS_ENV: &str = "SHMGRPC_COPY_THREADS";

/// The piece of a copy a thread takes at a time.
const CHUNK: usize = 4 << 20;

/// Copies `src` into `dst`, which must have the same length (as `<[u8]>::copy_from_slice`, which panics
/// otherwise). A copy of at least [`PARALLEL_MIN`] bytes is shared with helper threads while the process budget
/// has some free (see the module docs); the call returns when every byte is copied.
pub fn copy(dst: &mut [u8], src: &[u8]) {
    copy_with(budget(), dst, src);
}

/// Sets the process's budget of helper threads (0: every copy runs on its caller's thread). Copies running now
/// keep the helpers they have; later copies see the new budget.
pub fn set_helpers(n: usize) {
    budget().limit.store(n, Ordering::Release);
}

/// Helper threads the process's copies may start now (the budget less those running).
pub fn helpers_free() -> usize {
    budget().free()
}

fn budget() -> &'static Budget {
    static BUDGET: OnceLock<Budget> = OnceLock::new();
    BUDGET.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Budget::new(initial_helpers(std::env::var(HELPERS_ENV).ok().as_deref(), cores))
    })
}

/// The budget a process starts with: `env` (the value of [`HELPERS_ENV`]) if it is a count, else one helper per
/// spare core, at most [`MAX_HELPERS`].
fn initial_helpers(env: Option<&str>, cores: usize) -> usize {
    let default = cores.saturating_sub(1).min(MAX_HELPERS);
    match env.map(str::trim) {
        None | Some("") => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            tracing::warn!(value = v, default, "{HELPERS_ENV} is not a count of threads; using the default");
            default
        }),
    }
}

/// Helper threads the process may run for copies: `limit`, of which `busy` run now.
#[derive(Debug)]
struct Budget {
    limit: AtomicUsize,
    busy: AtomicUsize,
}

impl Budget {
    fn new(limit: usize) -> Budget {
        Budget { limit: AtomicUsize::new(limit), busy: AtomicUsize::new(0) }
    }

    fn free(&self) -> usize {
        self.limit.load(Ordering::Acquire).saturating_sub(self.busy.load(Ordering::Acquire))
    }

    /// Takes up to `want` helpers; they come back when the returned guard drops.
    fn take(&self, want: usize) -> Taken<'_> {
        let limit = self.limit.load(Ordering::Acquire);
        let mut got = 0;
        let _ = self.busy.fetch_update(Ordering::AcqRel, Ordering::Acquire, |busy| {
            got = limit.saturating_sub(busy).min(want);
            (got > 0).then_some(busy + got)
        });
        Taken { budget: self, n: got }
    }
}

/// Helpers taken from a [`Budget`], given back on drop (also when a copy panics).
struct Taken<'a> {
    budget: &'a Budget,
    n: usize,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.n > 0 {
            self.budget.busy.fetch_sub(self.n, Ordering::AcqRel);
        }
    }
}

/// A [`BufMut`] over a slice that writes large pieces with [`copy`]: encoding a protobuf message into a pool
/// buffer through it (prost writes a `bytes` field with one `put` or `put_slice`) shares that field's copy with
/// helper threads.
#[derive(Debug)]
pub struct Writer<'a>(&'a mut [u8]);

impl<'a> Writer<'a> {
    /// Writes into `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer(buf)
    }
}

// SAFETY: every method delegates to the `&mut [u8]` being written, which upholds `BufMut`'s contract; the overridden
// `put_slice` writes whole bytes into the front of the slice with safe code and then moves past them.
unsafe impl BufMut for Writer<'_> {
    fn remaining_mut(&self) -> usize {
        self.0.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: forwarded unchanged: the caller guarantees `cnt` bytes of `chunk_mut` were initialised.
        unsafe { self.0.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        self.0.chunk_mut()
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let n = src.chunk().len();
            self.put_slice(src.chunk());
            src.advance(n);
        }
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() < PARALLEL_MIN {
            self.0.put_slice(src);
            return;
        }
        assert!(self.0.len() >= src.len(), "Writer: {} bytes do not fit the {} left", src.len(), self.0.len());
        let (head, rest) = std::mem::take(&mut self.0).split_at_mut(src.len());
        copy(head, src);
        self.0 = rest;
    }
}

fn copy_with(budget: &Budget, dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy: source and destination lengths differ");
    if src.len() < PARALLEL_MIN {
        dst.copy_from_slice(src);
        return;
    }
    // One helper per 2 chunks beyond the caller's, so that each thread copies a few MiB at least.
    let want = (src.len() / (2 * CHUNK)).min(MAX_HELPERS);
    let helpers = budget.take(want);
    if helpers.n == 0 {
        dst.copy_from_slice(src);
        return;
    }
    let work = Mutex::new(dst.chunks_mut(CHUNK).zip(src.chunks(CHUNK)));
    let run = || {
        loop {
            // The lock is held only to take the next chunk, never while copying.
            let next = work.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some((d, s)) = next else { break };
            d.copy_from_slice(s);
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..helpers.n {
            // A helper that cannot start leaves its chunks to the caller and the other helpers.
            let _ = std::thread::Builder::new().name("shmgrpc-copy".into()).spawn_scoped(scope, run);
        }
        run();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).rotate_left((i % 7) as u32)).collect()
    }

    #[test]
    fn copies_every_byte_at_sizes_around_the_thresholds() {
        let local = Budget::new(MAX_HELPERS);
        for n in [0, 1, CHUNK - 1, PARALLEL_MIN - 1, PARALLEL_MIN, PARALLEL_MIN + CHUNK + 7, 5 * CHUNK + 3] {
            let src = pattern(n, 1);
            let mut dst = pattern(n, 2);
            copy_with(&local, &mut dst, &src);
            assert!(dst == src, "{n} bytes");
            assert_eq!(local.free(), MAX_HELPERS, "helpers back after {n} bytes");
        }
    }

    #[test]
    fn a_spent_budget_copies_on_the_callers_thread() {
        let local = Budget::new(0);
        let src = pattern(PARALLEL_MIN + 1, 3);
        let mut dst = vec![0; src.len()];
        copy_with(&local, &mut dst, &src);
        assert!(dst == src);
    }

    #[test]
    fn concurrent_copies_never_take_more_helpers_than_the_budget() {
        let local = Budget::new(2);
        let src = pattern(PARALLEL_MIN * 2, 4);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut dst = vec![0; src.len()];
                    for _ in 0..3 {
                        let taken = local.take(MAX_HELPERS);
                        assert!(taken.n <= 2);
                        drop(taken);
                        copy_with(&local, &mut dst, &src);
                        assert!(dst == src);
                    }
                });
            }
        });
        assert_eq!(local.free(), 2, "every helper came back");
    }

    #[test]
    fn a_lowered_budget_holds_for_later_copies_and_running_ones_keep_theirs() {
        let local = Budget::new(3);
        let held = local.take(2);
        local.limit.store(1, Ordering::Release);
        assert_eq!(local.free(), 0);
        assert_eq!(local.take(MAX_HELPERS).n, 0, "two still run, over the new limit of one");
        drop(held);
        assert_eq!(local.take(MAX_HELPERS).n, 1);
        local.limit.store(0, Ordering::Release);
        assert_eq!(local.take(MAX_HELPERS).n, 0);
    }

    #[test]
    fn a_writer_writes_small_and_large_pieces_in_order() {
        let big = pattern(PARALLEL_MIN + 5, 7);
        let mut out = vec![0u8; 3 + big.len() + 2 + 4];
        let mut w = Writer::new(&mut out);
        w.put_slice(b"abc");
        w.put(bytes::Bytes::from(big.clone()));
        w.put_u16(0x0102);
        w.put(&b"wxyz"[..]);
        assert_eq!(w.remaining_mut(), 0);
        assert_eq!(&out[..3], b"abc");
        assert!(out[3..3 + big.len()] == big[..]);
        assert_eq!(&out[3 + big.len()..], &[1, 2, b'w', b'x', b'y', b'z']);
    }

    #[test]
    #[should_panic(expected = "do not fit")]
    fn a_writer_refuses_more_than_its_slice() {
        let mut out = vec![0u8; PARALLEL_MIN];
        Writer::new(&mut out).put_slice(&vec![1; PARALLEL_MIN + 1]);
    }

    #[test]
    fn the_environment_sets_the_starting_budget() {
        assert_eq!(initial_helpers(None, 1), 0, "no spare core, no helper");
        assert_eq!(initial_helpers(None, 2), 1);
        assert_eq!(initial_helpers(None, 64), MAX_HELPERS);
        assert_eq!(initial_helpers(Some("0"), 8), 0);
        assert_eq!(initial_helpers(Some(" 6 "), 2), 6, "an explicit count is taken as it is");
        assert_eq!(initial_helpers(Some("lots"), 4), 3, "not a count: the default");
        assert_eq!(initial_helpers(Some(""), 4), 3);
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn lengths_must_match() {
        copy(&mut [0; 3], &[1; 4]);
    }
}
