//! The outbox: frames one end of a session queues for its peer, and the writer task that sends them.
//!
//! Queueing never blocks, on any thread, inside a runtime or not: the [`Sender`](super::sender::Sender), the
//! [`Receiver`](super::receiver::Receiver) and the `Drop` of a received region all send through it. The writer task
//! runs on the I/O runtime. A peer that lets [`MAX_QUEUED_FRAMES`] frames pile up is not reading its side channel:
//! the outbox closes and shuts the socket down, which ends the session, rather than let that peer cost anyone
//! memory or time.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::UnixStream;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::protocol::MAX_QUEUED_FRAMES;
use crate::side_channel;
use crate::sync::lock;
use crate::wire::{self, Kind};

/// Bytes of small frames the writer gathers into one write (a tuning of this implementation, not a protocol limit).
const COALESCE: usize = 64 * 1024;

/// A frame waiting for the writer task, with the descriptor it carries.
pub(crate) struct Outbound {
    pub(crate) kind: Kind,
    pub(crate) fd: Option<OwnedFd>,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsent {
    /// The session is closed (or closing).
    Closed,
    /// The peer let the queue fill up: this frame closed the outbox.
    Overflow,
}

impl From<Unsent> for std::io::Error {
    fn from(u: Unsent) -> Self {
        let why = match u {
            Unsent::Closed => "session closed",
            Unsent::Overflow => "the peer does not read its side channel",
        };
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, why)
    }
}

/// The queue of frames for the peer (see the module docs).
pub(crate) struct Outbox {
    /// `None` once closed.
    queue: Mutex<Option<UnboundedSender<Outbound>>>,
    /// Frames queued and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    /// Set when the queue overflowed.
    overflowed: AtomicBool,
    /// The side channel, shut down on overflow so that its reader and writer end at once.
    socket: Option<Arc<UnixStream>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("queued", &self.queued.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

/// The writer's end of an outbox.
pub(crate) struct Drain {
    rx: UnboundedReceiver<Outbound>,
    queued: Arc<AtomicUsize>,
}

impl Outbox {
    /// An open outbox for the side channel `socket` (`None` in tests that read the frames themselves) and the end
    /// its writer takes frames from.
    pub(crate) fn new(socket: Option<Arc<UnixStream>>) -> (Arc<Outbox>, Drain) {
        let (tx, rx) = unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let outbox =
            Outbox { queue: Mutex::new(Some(tx)), queued: queued.clone(), overflowed: AtomicBool::new(false), socket };
        (Arc::new(outbox), Drain { rx, queued })
    }

    /// Queues a frame for the peer. Never blocks.
    ///
    /// # Errors
    ///
    /// [`Unsent::Closed`] once the outbox is closed; [`Unsent::Overflow`] for the frame that found
    /// [`MAX_QUEUED_FRAMES`] waiting (the outbox is closed then).
    pub(crate) fn send(&self, kind: Kind, fd: Option<OwnedFd>) -> Result<(), Unsent> {
        let mut queue = lock(&self.queue);
        let tx = queue.as_ref().ok_or(Unsent::Closed)?;
        // Counted before it is sent, so the writer's decrement can never run ahead of it.
        if self.queued.fetch_add(1, Ordering::AcqRel) < MAX_QUEUED_FRAMES {
            return tx.send(Outbound { kind, fd }).map_err(|_| {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Unsent::Closed
            });
        }
        self.queued.fetch_sub(1, Ordering::AcqRel);
        self.overflowed.store(true, Ordering::Release);
        queue.take();
        drop(queue);
        if let Some(sock) = &self.socket {
            side_channel::shutdown(sock);
        }
        Err(Unsent::Overflow)
    }

    /// Whether the outbox is closed: the session ended, or the peer stopped reading.
    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.queue).is_none()
    }

    /// Whether it closed because the peer let the queue fill up.
    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Closes the outbox: nothing more is accepted (the session then shuts the socket down).
    pub(crate) fn close(&self) {
        lock(&self.queue).take();
    }
}

impl Drain {
    /// The next queued frame, waiting for one; `None` once the outbox is closed and empty.
    pub(crate) async fn next(&mut self) -> Option<Outbound> {
        let out = self.rx.recv().await?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(out)
    }

    /// The next queued frame if one is waiting now.
    pub(crate) fn try_next(&mut self) -> Option<Outbound> {
        let out = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(out)
    }

    /// Writes queued frames to `sock` until the outbox is closed and empty: several frames in one write when they
    /// pile up, a frame with a descriptor in a `sendmsg` of its own (protocol §3).
    ///
    /// # Errors
    ///
    /// A write failed, or made no progress for `WRITE_STALL`.
    pub(crate) async fn write_to(mut self, sock: &UnixStream) -> std::io::Result<()> {
        let mut buf = Vec::new();
        while let Some(first) = self.next().await {
            let mut next = Some(first);
            while let Some(out) = next.take() {
                let frame = wire::frame(out.kind);
                match out.fd {
                    Some(fd) => {
                        side_channel::write_all(sock, &buf, None).await?;
                        buf.clear();
                        let mut one = Vec::new();
                        wire::encode_frame(&frame, &mut one);
                        side_channel::write_all(sock, &one, Some(fd.as_fd())).await?;
                    }
                    None => wire::encode_frame(&frame, &mut buf),
                }
                if buf.len() < COALESCE {
                    next = self.try_next();
                }
            }
            side_channel::write_all(sock, &buf, None).await?;
            buf.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1;

    fn release(segment: u32) -> Kind {
        Kind::Release(v1::Release { segment, generation: 1 })
    }

    #[test]
    fn frames_come_out_in_order_and_closing_refuses_more() {
        let (outbox, mut drain) = Outbox::new(None);
        outbox.send(release(1), None).unwrap();
        outbox.send(release(2), None).unwrap();
        outbox.close();
        assert_eq!(outbox.send(release(3), None), Err(Unsent::Closed));
        assert!(outbox.is_closed() && !outbox.overflowed());
        let got: Vec<Kind> = std::iter::from_fn(|| drain.try_next()).map(|o| o.kind).collect();
        assert_eq!(got, vec![release(1), release(2)], "frames queued before closing are still there to write");
    }

    #[test]
    fn a_peer_that_lets_the_queue_fill_closes_the_outbox() {
        let (outbox, mut drain) = Outbox::new(None);
        for i in 0..MAX_QUEUED_FRAMES {
            outbox.send(release(i as u32), None).unwrap();
        }
        assert_eq!(outbox.send(release(0), None), Err(Unsent::Overflow));
        assert!(outbox.is_closed() && outbox.overflowed());
        assert_eq!(outbox.send(release(0), None), Err(Unsent::Closed));
        // The writer still drains what was queued, then sees the end.
        assert_eq!(std::iter::from_fn(|| drain.try_next()).count(), MAX_QUEUED_FRAMES);
    }
}
