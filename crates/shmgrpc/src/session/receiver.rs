//! The receiving half of a session: the peer's segments (registrations, within per-session and process-wide
//! caps), resolving references into message parts, and releases and returns back to the peer.

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

use super::loan::{Incoming, IncomingView, Located, OutgoingView};
use super::{ByRegion, Session, lock, take_one};
use crate::attach::AttachCache;
use crate::proto::v1::{self, part};
use crate::protocol::{MAX_INLINE, MAX_PARTS, MAX_PEER_SEGMENTS, MAX_PROCESS_PEER_BYTES, MAX_SESSION_PEER_BYTES};
use crate::segment::{PeerSegment, PosixName, SegmentHandle, SysVId};
use crate::stats::Event;
use crate::wire::{Kind, Reference};

/// Bytes of peer segments mapped by all sessions of this process.
static PROCESS_PEER_BYTES: AtomicU64 = AtomicU64::new(0);

/// The receiver's bookkeeping of one session.
#[derive(Default)]
pub(super) struct ReceiverState {
    /// The peer's segments we have mapped.
    pub(super) peer: AttachCache<u32>,
    /// Their bytes, as counted against the process-wide cap.
    mapped: AtomicU64,
    /// Segment ids whose registration we refused (bounded): messages naming them are not held back.
    refused: Mutex<HashSet<u32>>,
    /// Woken by every registration (accepted or refused), and when the session closes.
    pub(super) registered: Arc<Notify>,
    /// Live regions of the peer's memory: slices of them are sent back without a copy.
    regions: Mutex<Vec<Weak<Incoming>>>,
    /// Regions we sent back to the peer, kept until it answers `Returned`.
    returning: Mutex<ByRegion<Arc<Incoming>>>,
}

impl ReceiverState {
    pub(super) fn returning_count(&self) -> usize {
        lock(&self.returning).values().map(Vec::len).sum()
    }

    pub(super) fn close(&self) {
        let returning = std::mem::take(&mut *lock(&self.returning));
        drop(returning);
        lock(&self.regions).clear();
        lock(&self.refused).clear();
        self.peer.clear();
        PROCESS_PEER_BYTES.fetch_sub(self.mapped.swap(0, Ordering::AcqRel), Ordering::AcqRel);
        self.registered.notify_waiters();
    }
}

/// A resolved reference: the message's parts, and the peer segments they lie in (to check afterwards that none
/// was shrunk under the reader).
pub(crate) struct Resolved {
    pub(crate) parts: Vec<Bytes>,
    pub(crate) segments: Vec<Arc<PeerSegment>>,
}

impl Session {
    /// A `Register` from the peer: map the segment (or refuse it), and answer `Registered` either way.
    pub(super) fn on_register(&self, reg: v1::Register, fd: Option<OwnedFd>) -> Result<(), String> {
        let handle = match (fd, reg.source) {
            (Some(fd), None) => Ok(SegmentHandle::Memfd(fd)),
            (None, Some(v1::register::Source::PosixName(name))) => {
                PosixName::parse(&name).map(SegmentHandle::Posix).map_err(|_| "not a shmgrpc segment name".to_string())
            }
            (None, Some(v1::register::Source::SysvId(id))) => Ok(SegmentHandle::SysV(SysVId::from_raw(id))),
            (None, None) => Err("a registration carries a descriptor, a name or an id".to_string()),
            (Some(_), Some(_)) => Err("a registration carries one descriptor, or a name or id, not both".to_string()),
        };
        let result = handle.and_then(|h| self.accept_segment(reg.segment, reg.len, h));
        let error = match result {
            Ok(()) => {
                lock(&self.receiver.refused).remove(&reg.segment);
                String::new()
            }
            Err(e) => {
                self.params.recorder.record_both(Event::PeerRefusal);
                tracing::debug!(error = %e, "refused a segment from the peer");
                let mut refused = lock(&self.receiver.refused);
                if refused.len() < MAX_PEER_SEGMENTS {
                    refused.insert(reg.segment);
                }
                e
            }
        };
        self.receiver.registered.notify_waiters();
        self.send(Kind::Registered(v1::Registered { segment: reg.segment, error }), None)
            .map_err(|e| format!("side channel: {e}"))
    }

    /// Maps a segment the peer registered, within the per-session and process-wide caps. A named segment (POSIX,
    /// System V) must have been created by the peer process itself: a name or id alone proves nothing.
    fn accept_segment(&self, segment: u32, len: u64, handle: SegmentHandle) -> Result<(), String> {
        let rx = &self.receiver;
        if rx.peer.get(&segment).is_some() {
            return Err("segment id already registered in this session".into());
        }
        let st = rx.peer.stats();
        if st.segments >= MAX_PEER_SEGMENTS {
            return Err(format!("too many segments registered (at most {MAX_PEER_SEGMENTS} per session)"));
        }
        let seg = PeerSegment::open_created_by(handle, len, self.peer_pid).map_err(|e| e.to_string())?;
        // The real size counts, not the claim: the whole segment is mapped.
        let size = seg.len() as u64;
        if st.bytes.saturating_add(size) > MAX_SESSION_PEER_BYTES {
            return Err(format!("segments of more than {MAX_SESSION_PEER_BYTES} bytes in one session"));
        }
        PROCESS_PEER_BYTES
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(size).filter(|&t| t <= MAX_PROCESS_PEER_BYTES)
            })
            .map_err(|_| "this process maps as many peer bytes as it allows".to_string())?;
        rx.mapped.fetch_add(size, Ordering::AcqRel);
        rx.peer.insert(segment, seg);
        if !self.is_alive() {
            // Closed meanwhile: `close` may have cleared the cache before this insert.
            self.on_forget(segment);
        }
        Ok(())
    }

    /// The peer's segment no longer exists: drop our mapping (readers keep theirs until they are done).
    pub(super) fn on_forget(&self, segment: u32) {
        let rx = &self.receiver;
        if let Some(seg) = rx.peer.get(&segment)
            && rx.peer.detach(&segment)
        {
            let size = seg.len() as u64;
            let before = rx.mapped.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| m.checked_sub(size));
            if before.is_ok() {
                PROCESS_PEER_BYTES.fetch_sub(size, Ordering::AcqRel);
            }
        }
    }

    /// Whether a reference names a segment of the peer's whose registration has not arrived yet (neither mapped
    /// nor refused). The body wrappers hold such a message back until it has (protocol §6).
    pub(crate) fn awaits_registration(&self, r: &Reference) -> bool {
        if !self.is_alive() {
            return false;
        }
        let refused = lock(&self.receiver.refused);
        r.parts.iter().any(|p| match &p.kind {
            Some(part::Kind::Sender(reg)) => {
                self.receiver.peer.get(&reg.segment).is_none() && !refused.contains(&reg.segment)
            }
            _ => false,
        })
    }

    /// Resolves a reference the peer sent into the parts of the message, zero-copy: `sender` parts over the peer's
    /// segments (released when their last `Bytes` is dropped), `receiver` parts over our own buffers.
    pub(crate) fn resolve(self: &Arc<Self>, r: Reference) -> Result<Resolved, tonic::Status> {
        use tonic::Status;
        if r.parts.is_empty() || r.parts.len() > MAX_PARTS {
            return Err(Status::invalid_argument("shmgrpc reference with no parts or too many"));
        }
        let inline: usize = r
            .parts
            .iter()
            .filter_map(|p| if let Some(part::Kind::Inline(b)) = &p.kind { Some(b.len()) } else { None })
            .sum();
        if inline > MAX_INLINE {
            return Err(Status::invalid_argument("shmgrpc reference with more than 32 KiB of inline bytes"));
        }
        let mut out = Vec::with_capacity(r.parts.len());
        let mut segments = Vec::new();
        let mut returned = Vec::new();
        for p in r.parts {
            out.push(match p.kind {
                None => return Err(Status::invalid_argument("shmgrpc reference part without a kind")),
                Some(part::Kind::Inline(b)) => b,
                Some(part::Kind::Sender(reg)) => {
                    let seg = self.receiver.peer.get(&reg.segment).ok_or_else(|| {
                        Status::invalid_argument("shmgrpc reference to a segment the peer never registered")
                    })?;
                    let (start, end) = crate::segment::check_range(seg.backend(), reg.offset, reg.len, seg.len())
                        .map_err(|e| Status::out_of_range(format!("shmgrpc reference out of range: {e}")))?;
                    segments.push(seg.clone());
                    let incoming = Arc::new(Incoming {
                        seg,
                        segment: reg.segment,
                        generation: reg.generation,
                        start,
                        end,
                        session: Arc::downgrade(self),
                    });
                    {
                        let mut regions = lock(&self.receiver.regions);
                        regions.retain(|w| w.strong_count() > 0);
                        regions.push(Arc::downgrade(&incoming));
                    }
                    Bytes::from_owner(IncomingView(incoming))
                }
                Some(part::Kind::Receiver(reg)) => {
                    let buf = self.held_buffer(reg.segment, reg.generation).ok_or_else(|| {
                        Status::invalid_argument("shmgrpc reference to a buffer of ours that the peer does not hold")
                    })?;
                    // The peer names the range in our segment; the buffer may be a slab slot at an offset in it.
                    let out_of_range = |e: String| Status::out_of_range(format!("shmgrpc reference out of range: {e}"));
                    let offset = reg
                        .offset
                        .checked_sub(buf.lease.offset() as u64)
                        .ok_or_else(|| out_of_range("before the buffer".into()))?;
                    let (start, end) =
                        crate::segment::check_range(crate::segment::Backend::Memfd, offset, reg.len, buf.lease.len())
                            .map_err(|e| out_of_range(e.to_string()))?;
                    returned.push((reg.segment, reg.generation));
                    Bytes::from_owner(OutgoingView(buf)).slice(start..end)
                }
            });
        }
        // We hold our own buffers again through the Bytes just made: the peer may drop its holds.
        for (segment, generation) in returned {
            if let Err(e) = self.send(Kind::Returned(v1::Returned { segment, generation }), None) {
                tracing::debug!(error = %e, "returned not sent; the session is closing");
            }
        }
        Ok(Resolved { parts: out, segments })
    }

    /// Sends a release for a region of the peer's (best effort: a closed session needs none).
    pub(super) fn send_release(&self, segment: u32, generation: u32) {
        if !self.is_alive() {
            return;
        }
        if let Err(e) = self.send(Kind::Release(v1::Release { segment, generation }), None) {
            tracing::debug!(error = %e, "release not sent; the session is closing");
        }
    }

    /// Keeps regions we sent back as `receiver` parts until the peer answers `Returned`.
    pub(super) fn keep_returning(&self, regions: Vec<Arc<Incoming>>) {
        if regions.is_empty() {
            return;
        }
        let mut returning = lock(&self.receiver.returning);
        for region in regions {
            returning.entry((region.segment, region.generation)).or_default().push(region);
        }
    }

    /// The peer resolved a `receiver` part of ours: drop one region kept for it (its release follows once nothing
    /// else reads it).
    pub(super) fn on_returned(&self, segment: u32, generation: u32) {
        let taken = take_one(&mut lock(&self.receiver.returning), (segment, generation));
        // Dropped outside the lock: dropping an `Incoming` queues a frame.
        if taken.is_none() {
            self.params.recorder.record_both(Event::BadRelease);
            self.params.recorder.record_both(Event::PeerRefusal);
            tracing::debug!(segment, "refused a return of a region we did not send back");
        }
    }

    /// Finds `s` in one of the peer's live regions.
    pub(super) fn locate_region(&self, s: &[u8]) -> Option<Located> {
        for region in lock(&self.receiver.regions).iter().filter_map(Weak::upgrade) {
            if let Some(offset) = region.contains(s) {
                return Some(Located::Theirs { region, offset, len: s.len() as u64 });
            }
        }
        None
    }

    pub(super) fn has_live_regions(&self) -> bool {
        let mut regions = lock(&self.receiver.regions);
        regions.retain(|w| w.strong_count() > 0);
        !regions.is_empty()
    }
}
