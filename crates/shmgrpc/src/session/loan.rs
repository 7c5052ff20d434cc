//! The owners behind zero-copy `Bytes`: [`Outgoing`] (one of our pool buffers while it serves for sending),
//! [`Incoming`] (a region of the peer's memory we read; its drop sends the release) and [`Loan`] (a buffer the
//! user writes a payload into before sending it). They are what the [`Sender`](super::sender::Sender) and the
//! [`Receiver`](super::receiver::Receiver) hand each other, through the session, without knowing each other.

use std::sync::{Arc, Weak};

use bytes::Bytes;

use super::Session;
use super::outbox::Outbox;
use crate::pool::Lease;
use crate::proto::v1;
use crate::segment::PeerSegment;
use crate::wire::Kind;

/// One of our pool buffers while it serves for sending. It lives as long as any `Bytes` over it (a loan, or a
/// received echo of it) or any hold for the peer; then the lease returns to the pool.
pub(crate) struct Outgoing {
    pub(super) lease: Lease,
}

impl Outgoing {
    pub(super) fn new(lease: Lease) -> Arc<Outgoing> {
        Arc::new(Outgoing { lease })
    }

    /// Offset of `s` in this buffer, if it lies wholly inside it.
    pub(super) fn contains(&self, s: &[u8]) -> Option<usize> {
        let base = self.lease.as_ptr() as usize;
        let p = s.as_ptr() as usize;
        (p >= base && p + s.len() <= base + self.lease.len()).then(|| p - base)
    }
}

/// `Bytes` owner over an [`Outgoing`].
pub(super) struct OutgoingView(pub(super) Arc<Outgoing>);

impl AsRef<[u8]> for OutgoingView {
    fn as_ref(&self) -> &[u8] {
        &self.0.lease
    }
}

/// A region of the peer's memory this process reads: one per `sender` part received. Dropping it sends the
/// release for that part (queued for the I/O thread: dropping never blocks, on any thread).
pub(crate) struct Incoming {
    pub(super) seg: Arc<PeerSegment>,
    pub(super) segment: u32,
    pub(super) generation: u32,
    pub(super) start: usize,
    pub(super) end: usize,
    /// Where the release goes: the outbox of the session that received the region.
    pub(super) outbox: Weak<Outbox>,
}

impl Incoming {
    /// Offset of `s` in the peer's segment, if it lies wholly inside this region.
    pub(super) fn contains(&self, s: &[u8]) -> Option<u64> {
        let base = self.seg.as_slice().as_ptr() as usize;
        let p = s.as_ptr() as usize;
        (p >= base + self.start && p + s.len() <= base + self.end).then(|| (p - base) as u64)
    }
}

impl AsRef<[u8]> for Incoming {
    fn as_ref(&self) -> &[u8] {
        &self.seg.as_slice()[self.start..self.end]
    }
}

impl Drop for Incoming {
    /// Queues the release (never blocks); a closed session needs none: the peer got everything back when it ended.
    fn drop(&mut self) {
        if let Some(outbox) = self.outbox.upgrade() {
            let release = Kind::Release(v1::Release { segment: self.segment, generation: self.generation });
            if let Err(e) = outbox.send(release, None) {
                tracing::debug!(?e, "release not sent; the session is closing");
            }
        }
    }
}

/// `Bytes` owner over an [`Incoming`] (the `Arc` lets the encoder find and keep it for an echo).
pub(super) struct IncomingView(pub(super) Arc<Incoming>);

impl AsRef<[u8]> for IncomingView {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().as_ref()
    }
}

/// Where the sender may find slices that already lie in the peer's memory: the receiver's live regions, which the
/// session lends the sender while it encodes (so neither half knows the other).
pub(crate) trait PeerRegions {
    /// Whether any region of the peer's is alive (if none is, the encoder need not look).
    fn any(&self) -> bool;
    /// The live region `s` lies wholly inside, and `s`'s offset in the peer's segment.
    fn locate(&self, s: &[u8]) -> Option<(Arc<Incoming>, u64)>;
}

/// No regions: for a sender used without a receiver.
#[cfg(test)]
pub(crate) struct NoRegions;

#[cfg(test)]
impl PeerRegions for NoRegions {
    fn any(&self) -> bool {
        false
    }
    fn locate(&self, _: &[u8]) -> Option<(Arc<Incoming>, u64)> {
        None
    }
}

/// A slice the encoder found already in shared memory.
pub(crate) enum Located {
    /// Inside one of our loans: sent as a `sender` part, without a copy.
    Ours { buf: Arc<Outgoing>, offset: usize, len: usize },
    /// Inside a region the peer sent us: sent back as a `receiver` part, without a copy.
    Theirs { region: Arc<Incoming>, offset: u64, len: u64 },
}

/// A buffer for a payload that will be sent without a copy: written in place, then frozen into `Bytes` for a
/// `bytes` field. Backed by a pool buffer of the session when there is one, by ordinary memory otherwise (the
/// message then simply goes inline), so the same code works with and without shared memory.
pub struct Loan {
    inner: LoanInner,
}

enum LoanInner {
    Shared { buf: Arc<Outgoing>, session: Weak<Session> },
    Heap(Vec<u8>),
}

impl std::fmt::Debug for Loan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loan").field("len", &self.len()).field("shared", &self.is_shared()).finish()
    }
}

impl Loan {
    pub(crate) fn heap(len: usize) -> Loan {
        Loan { inner: LoanInner::Heap(vec![0; len]) }
    }

    pub(super) fn shared(lease: Lease, session: Weak<Session>) -> Loan {
        Loan { inner: LoanInner::Shared { buf: Outgoing::new(lease), session } }
    }

    /// Whether the loan is shared memory (false: ordinary memory, because there is no session or no budget).
    pub fn is_shared(&self) -> bool {
        matches!(self.inner, LoanInner::Shared { .. })
    }

    /// Payload length.
    pub fn len(&self) -> usize {
        self.as_ref().len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Turns the written loan into `Bytes` for a message field. Sending those `Bytes` through the session they
    /// came from copies nothing; the buffer returns to the pool when every `Bytes` is dropped and the peer has
    /// released every reference to it.
    pub fn freeze(self) -> Bytes {
        match self.inner {
            LoanInner::Heap(v) => Bytes::from(v),
            LoanInner::Shared { buf, session } => {
                if let Some(s) = session.upgrade() {
                    s.sender.note_loan(&buf);
                }
                Bytes::from_owner(OutgoingView(buf))
            }
        }
    }
}

impl std::ops::Deref for Loan {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.inner {
            LoanInner::Heap(v) => v,
            LoanInner::Shared { buf, .. } => &buf.lease,
        }
    }
}

impl std::ops::DerefMut for Loan {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.inner {
            LoanInner::Heap(v) => v,
            LoanInner::Shared { buf, .. } => {
                // Unique until frozen: nothing else holds this Arc (the session learns of it in `freeze`).
                &mut Arc::get_mut(buf).expect("an unfrozen loan is unique").lease
            }
        }
    }
}
