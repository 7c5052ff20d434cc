//! The process-wide I/O runtime: one thread (`shmgrpc-io`) that runs every side channel of the process (accept,
//! handshakes, frame readers and writers) and the timers of the bounded waits.
//!
//! Side-channel I/O never runs on the caller's runtime: a user's runtime may be single-threaded, busy or shutting
//! down, and none of that may delay a release or a registration another peer waits for. The number of threads is
//! fixed, whatever the number of sessions. Nothing on this thread ever blocks on a peer: every socket is
//! non-blocking and every wait is a future.

use std::future::Future;
use std::sync::{Mutex, OnceLock};

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinHandle;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static INIT: Mutex<()> = Mutex::new(());

/// The I/O runtime's handle, starting the runtime on first use.
///
/// # Errors
///
/// The thread could not be started (the process is out of threads or memory).
pub(crate) fn handle() -> std::io::Result<&'static Handle> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle());
    }
    // One builder at a time: a runtime built in a race and then dropped would have to be dropped outside any
    // async context, which a caller cannot promise.
    let _init = crate::sync::lock(&INIT);
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle());
    }
    let rt = Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .thread_name("shmgrpc-io")
        .enable_io()
        .enable_time()
        .build()?;
    Ok(RUNTIME.get_or_init(|| rt).handle())
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
