//! The process-wide I/O runtime: one thread (`shmgrpc-io`) that runs every side channel of the process (accept,
//! handshakes, frame readers and writers) and the timers of the bounded waits.
//!
//! Side-channel I/O never runs on the caller's runtime: a user's runtime may be single-threaded, busy or shutting
//! down, and none of that may delay a release or a registration another peer waits for. The number of threads is
//! fixed, whatever the number of sessions. Nothing on this thread ever blocks on a peer: every socket is
//! non-blocking and every wait is a future.
//!
//! A child made by `fork` inherits none of the parent's threads: its first use of the runtime starts a runtime
//! of its own (the inherited one, whose thread does not exist in the child, is leaked, never dropped: dropping it
//! would wait for that thread).

use std::future::Future;
use std::sync::{Mutex, OnceLock};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

/// The runtime of the process that started it (by pid).
static RUNTIME: OnceLock<(u32, Runtime)> = OnceLock::new();
/// The runtime of a forked child (by pid), leaked: a grandchild leaks its parent's in turn.
static CHILD: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);
static INIT: Mutex<()> = Mutex::new(());

fn build() -> std::io::Result<Runtime> {
    Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .thread_name("shmgrpc-io")
        .enable_io()
        .enable_time()
        .build()
}

/// The I/O runtime's handle, starting the runtime on first use in this process (a forked child starts its own).
///
/// # Errors
///
/// The thread could not be started (the process is out of threads or memory).
pub(crate) fn handle() -> std::io::Result<&'static Handle> {
    let pid = crate::pid::id();
    if let Some((owner, rt)) = RUNTIME.get()
        && *owner == pid
    {
        return Ok(rt.handle());
    }
    // One builder at a time: a runtime built in a race and then dropped would have to be dropped outside any
    // async context, which a caller cannot promise.
    let _init = crate::sync::lock(&INIT);
    match RUNTIME.get() {
        None => {
            let rt = build()?;
            return Ok(RUNTIME.get_or_init(|| (pid, rt)).1.handle());
        }
        Some((owner, rt)) if *owner == pid => return Ok(rt.handle()),
        Some(_) => {}
    }
    let mut child = crate::sync::lock(&CHILD);
    if let Some((owner, rt)) = *child
        && owner == pid
    {
        return Ok(rt.handle());
    }
    let rt: &'static Runtime = Box::leak(Box::new(build()?));
    *child = Some((pid, rt));
    Ok(rt.handle())
}

/// Spawns `fut` on the I/O runtime.
///
/// # Errors
///
/// As [`handle`].
pub(crate) fn spawn<F>(fut: F) -> std::io::Result<JoinHandle<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Ok(handle()?.spawn(fut))
}

/// A timer on the I/O runtime's clock, usable from any thread or runtime (even one without a timer).
pub(crate) fn sleep(d: std::time::Duration) -> Option<std::pin::Pin<Box<tokio::time::Sleep>>> {
    let h = handle().ok()?;
    let _enter = h.enter();
    Some(Box::pin(tokio::time::sleep(d)))
}
