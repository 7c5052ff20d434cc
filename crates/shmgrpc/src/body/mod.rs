//! The two body wrappers that give the context-free codec its session, and keep every wait asynchronous.
//!
//! - [`SessionBody`] (`outgoing.rs`) wraps a call's *outgoing* body: it makes the call's session current on the
//!   thread for exactly the duration of each poll (the encoder runs inside that poll and looks it up), and holds a
//!   message that went into shared memory back until the peer can take it: until the peer has answered the
//!   registrations of the segments it names, and, for a call's first such message, until the peer holds less than
//!   the in-flight window. If the peer refuses a segment, or the wait runs out, the message goes inline instead,
//!   rebuilt from our own buffers: no refusal ever fails a call (protocol §5, §7).
//! - [`HoldBack`] (`incoming.rs`) wraps a call's *incoming* body: a peer that does not wait for its registrations'
//!   answers (protocol version 2 allows it) may send a reference before the registration of a segment it names.
//!   `HoldBack` reads the gRPC message framing, and holds such a message (and everything after it) back until the
//!   registration has arrived, for at most [`REGISTRATION_WAIT`](crate::protocol::REGISTRATION_WAIT); the
//!   synchronous decoder then always finds what it needs, or fails with a status (protocol §6).
//!
//! Waits are futures polled by the body (never a blocked thread), each bounded, each woken by the session's
//! notifications.

mod incoming;
mod outgoing;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;

pub(crate) use incoming::HoldBack;
#[cfg(fuzzing)]
pub(crate) use incoming::scan_all;
pub(crate) use outgoing::{Gate, SessionBody};

use crate::session::Session;
use crate::stats::{Fallback, Recorder};

/// The call whose outgoing body is being polled on this thread: its session (if it has one), the channel's or
/// server's counters, what the encoder decided so far for this call, and the messages it encoded in this poll
/// that must wait before they leave.
pub(crate) struct Current {
    pub(crate) session: Option<Arc<Session>>,
    pub(crate) recorder: Arc<Recorder>,
    /// Messages from this size up are meant for shared memory (counted as fallbacks when they go inline).
    pub(crate) threshold: usize,
    /// Why a call without a session sends inline (`None`: shared memory is off for this channel or server, or the
    /// peer never asked for a session).
    pub(crate) fallback: Option<Fallback>,
    /// Whether a message of this call went (or waits to go) through shared memory: only the first one waits for the
    /// in-flight window (later ones of a stream may be what the peer holds until the call ends).
    pub(crate) window_checked: bool,
    /// The window stayed full for a whole bounded wait of this call: its later large messages go inline at once
    /// while it is full.
    pub(crate) window_gave_up: bool,
    /// The call's number in its session (protocol version 3), which tags our references for `CallEnd`.
    pub(crate) call: Option<u64>,
    /// Messages of this call encoded so far (the next one's index).
    pub(crate) messages: u64,
    /// References encoded in this poll so far (a gate names its reference by this ordinal in the chunk).
    pub(crate) references: usize,
    /// Messages encoded in this poll that must wait before they leave.
    pub(crate) gates: Vec<Gate>,
}

impl Current {
    fn new(
        session: Option<Arc<Session>>,
        recorder: Arc<Recorder>,
        threshold: usize,
        fallback: Option<Fallback>,
    ) -> Self {
        Current {
            session,
            recorder,
            threshold,
            fallback,
            window_checked: false,
            window_gave_up: false,
            call: None,
            messages: 0,
            references: 0,
            gates: Vec::new(),
        }
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

/// Runs `f` with the call whose body is being polled on this thread, if any (the encoder's only context).
pub(crate) fn with_current<R>(f: impl FnOnce(Option<&mut Current>) -> R) -> R {
    CURRENT.with(|c| f(c.borrow_mut().as_mut()))
}

/// Whether the body of a call with a session is being polled on this thread.
pub(crate) fn has_current_session() -> bool {
    CURRENT.with(|c| c.borrow().as_ref().is_some_and(|c| c.session.is_some()))
}

/// Makes `slot`'s call current on this thread until dropped (also on panic), then puts it back into `slot` and
/// restores whatever was current before.
struct Enter<'a> {
    slot: &'a mut Option<Current>,
    prev: Option<Current>,
}

impl<'a> Enter<'a> {
    fn new(slot: &'a mut Option<Current>) -> Self {
        let prev = CURRENT.with(|c| c.replace(slot.take()));
        Enter { slot, prev }
    }
}

impl Drop for Enter<'_> {
    fn drop(&mut self) {
        let prev = self.prev.take();
        *self.slot = CURRENT.with(|c| c.replace(prev));
    }
}

/// A bounded asynchronous wait on a `Notify`: `Ready(true)` when the condition holds, `Ready(false)` when the
/// deadline passed first.
struct Wait {
    notified: Option<Pin<Box<OwnedNotified>>>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Wait {
    fn new(limit: std::time::Duration) -> Self {
        Wait { notified: None, deadline: crate::io::sleep(limit) }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        notify: &Arc<tokio::sync::Notify>,
        mut ready: impl FnMut() -> bool,
    ) -> Poll<bool> {
        loop {
            let n = match &mut self.notified {
                Some(n) => n,
                None => {
                    // Registered before the check, so a notification between the check and the poll is not lost.
                    let mut n = Box::pin(notify.clone().notified_owned());
                    n.as_mut().enable();
                    self.notified.insert(n)
                }
            };
            if ready() {
                return Poll::Ready(true);
            }
            if n.as_mut().poll(cx).is_ready() {
                self.notified = None;
                continue;
            }
            return match &mut self.deadline {
                Some(d) => d.as_mut().poll(cx).map(|()| false),
                None => Poll::Ready(false),
            };
        }
    }
}
