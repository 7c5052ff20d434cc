//! The SIGBUS guard for peer mappings that can shrink under us.
//!
//! A memfd is sealed against shrinking and a System V segment cannot shrink, but a POSIX segment is an ordinary
//! tmpfs file: its owner can truncate it while we have it mapped, and the next read past the new end raises SIGBUS.
//! So every read-only mapping of a peer's POSIX segment is registered here, and a process-wide SIGBUS handler that
//! finds the faulting address in a registered range maps anonymous zero pages over the rest of that range and lets
//! the read continue: the reader sees zeros instead of dying, and the mapping is marked poisoned so that callers
//! (the codec) can turn the message into an error. Faults outside registered ranges go to the previous handler, or
//! kill the process as they would have.
//!
//! The handler only reads atomics and calls `mmap`, both async-signal-safe.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How many mappings can be guarded at once.
const SLOTS: usize = 4096;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { start: AtomicUsize::new(0), len: AtomicUsize::new(0), poisoned: AtomicBool::new(false) };
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);

/// The handler that was installed before ours.
struct Previous(libc::sigaction);
// SAFETY: a plain C struct of integers, a signal mask and function pointers, written once before it is shared.
unsafe impl Sync for Previous {}
// SAFETY: as above.
unsafe impl Send for Previous {}
static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// A registered range; unregistered when dropped (before the mapping goes, so a later mapping at the same address
/// is never mistaken for it).
#[derive(Debug)]
pub(crate) struct Guard {
    slot: usize,
}

impl Guard {
    /// Whether a read ran past the end of the segment (the owner shrank it) since it was mapped.
    pub(crate) fn poisoned(&self) -> bool {
        TABLE[self.slot].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        s.len.store(0, Ordering::Release);
        s.start.store(0, Ordering::Release);
    }
}

/// Registers `len` bytes at `start` (installing the handler the first time). `None` when the table is full.
pub(crate) fn protect(start: *const u8, len: usize) -> Option<Guard> {
    install();
    let start = start as usize;
    for (i, s) in TABLE.iter().enumerate() {
        // Claim the slot with its length first, so the handler never sees a start without its length.
        if s.len.compare_exchange(0, len, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            s.poisoned.store(false, Ordering::Release);
            s.start.store(start, Ordering::Release);
            return Some(Guard { slot: i });
        }
    }
    None
}

fn install() {
    PREVIOUS.get_or_init(|| {
        PAGE.store(rustix::param::page_size(), Ordering::Relaxed);
        // SAFETY: zeroed sigaction structs are valid; the handler is an `extern "C"` function with the SA_SIGINFO
        // signature; `prev` receives the old disposition.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut prev: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut prev) != 0 {
                tracing::warn!("could not install the SIGBUS guard; POSIX segments from peers are unprotected");
            }
            Previous(prev)
        }
    });
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; si_addr is the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= start + len {
            continue;
        }
        // Zero pages from the faulting page to the end of the range: everything past the new end would fault too.
        let from = addr & !(page - 1);
        let end = (start + len).next_multiple_of(page);
        // SAFETY: [from, end) lies inside a mapping of ours that is registered and therefore still mapped; replacing
        // its pages with anonymous read-only zero pages changes what readers see, never whether they may read.
        let p = unsafe {
            libc::mmap(
                from as *mut libc::c_void,
                end - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            s.poisoned.store(true, Ordering::Release);
            return;
        }
    }
    // Not ours: behave as if we were not there.
    let Some(Previous(prev)) = PREVIOUS.get() else { return };
    let handler = prev.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: restoring the default disposition; returning re-executes the fault, which then kills the process
        // exactly as it would have without us.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        return;
    }
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this signature.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}
