//! This process's id, asked for on every call (is a session this process's, or a forked child's copy?) without a
//! system call each time.
//!
//! glibc stopped caching `getpid` in 2.25, so `std::process::id()` is a system call: three per small call on the
//! hot paths of a client and a server (about 0.2 us each on our machines, more under a hypervisor). The id is kept
//! here instead and forgotten in a child made by `fork` (a `pthread_atfork` handler), which then asks once.
//!
//! A child made without the C library's `fork` (a raw `clone` system call, glibc's `_Fork`) runs no `atfork`
//! handlers: such a child sees its parent's id here until it execs. Python's `os.fork`, `multiprocessing` and
//! every pre-fork server call `fork`.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The cached id; 0 when it must be asked for (no process has id 0).
static PID: AtomicU32 = AtomicU32::new(0);
/// Registers the handler once per process image (a forked child inherits the registration).
static REGISTER: Once = Once::new();
/// Whether the handler is registered, so that the id may be cached.
static CACHING: AtomicBool = AtomicBool::new(false);

/// Forgets the cached id in a child just made by `fork`. Only an atomic store: async-signal-safe, as a handler
/// run in a child of a multithreaded process must be.
extern "C" fn forget_in_child() {
    PID.store(0, Ordering::Relaxed);
}

/// This process's id (`getpid`), without a system call once known.
pub(crate) fn id() -> u32 {
    match PID.load(Ordering::Relaxed) {
        0 => ask(),
        pid => pid,
    }
}

#[cold]
fn ask() -> u32 {
    REGISTER.call_once(|| {
        // SAFETY: `pthread_atfork` only records the function pointers; `forget_in_child` is an `extern "C"` function
        // with no arguments that lives as long as the program (this crate is linked in, or part of a Python
        // extension module, which CPython never unloads), and it only stores to an atomic.
        let registered = unsafe { libc::pthread_atfork(None, None, Some(forget_in_child)) } == 0;
        if !registered {
            tracing::debug!("pthread_atfork failed: the process id is asked for on every use");
        }
        CACHING.store(registered, Ordering::Release);
    });
    let pid = std::process::id();
    // Cached only once the handler is in place: a child can never see its parent's id.
    if CACHING.load(Ordering::Acquire) {
        PID.store(pid, Ordering::Relaxed);
    }
    pid
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cached_id_is_this_processs() {
        assert_eq!(super::id(), std::process::id());
        assert_eq!(super::id(), std::process::id());
    }

    #[test]
    fn a_forked_child_sees_its_own_id() {
        let parent = super::id();
        // SAFETY: the child only reads atomics, makes system calls (getpid, _exit) and exits without unwinding or
        // running destructors: nothing in it needs a lock another thread of the test harness might have held.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            let ok = super::id() == std::process::id() && super::id() != parent;
            // SAFETY: ends the child at once (see above).
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child made above; `status` is a valid place to write its status to.
        let waited = unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(waited, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "the child saw its parent's id");
        assert_eq!(super::id(), parent);
    }
}
