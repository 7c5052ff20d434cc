//! The receiving half of a session: the peer's segments (registrations, within per-session and process-wide
//! caps), resolving references into message parts, and the peer's regions we send back.
//!
//! [`Receiver`] owns that state and knows nothing of the sending half: frames go out through the session's
//! [`Outbox`] (a received region's drop queues its release there), and our own buffers that the peer sends back
//! (`receiver` parts) are found through a lookup the session lends to [`Receiver::resolve`]. Its unit tests (below)
//! drive it alone with segments made in the test.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::Notify;

use super::calls::MessageTag;
use super::loan::{Incoming, IncomingView, Outgoing, OutgoingView, PeerRegions};
use super::outbox::Outbox;
use super::{ByRegion, take_for_parts, take_one, take_tagged};
use crate::attach::AttachCache;
use crate::proto::v1::{self, part};
use crate::protocol::{
    MAX_FORGOTTEN_IDS, MAX_INLINE, MAX_PARTS, MAX_PEER_BYTES, MAX_PEER_SEGMENTS, MAX_PROCESS_PEER_BYTES,
    MAX_SESSION_PEER_BYTES,
};
use crate::segment::{PeerSegment, PosixName, SegmentHandle, SysVId};
use crate::stats::{Event, Recorder};
use crate::sync::lock;
use crate::wire::{Kind, Reference};

/// Bytes of peer segments mapped by all sessions of this process, in all and by peer process: the process-wide cap
/// and each peer's share of it (§5) count them.
static MAPPED: LazyLock<Mutex<Mapped>> = LazyLock::new(Default::default);

#[derive(Default)]
struct Mapped {
    total: u64,
    by_peer: HashMap<u64, u64>,
}

impl Mapped {
    /// Counts `size` more bytes for `peer`, if both caps allow it.
    fn add(&mut self, peer: u64, size: u64) -> Result<(), String> {
        let total = self.total.checked_add(size).filter(|&t| t <= MAX_PROCESS_PEER_BYTES);
        let Some(total) = total else { return Err("this process maps as many peer bytes as it allows".into()) };
        let mine = self.by_peer.get(&peer).copied().unwrap_or(0).checked_add(size).filter(|&m| m <= MAX_PEER_BYTES);
        let Some(mine) = mine else { return Err("this peer maps as many bytes here as one peer may".into()) };
        self.total = total;
        self.by_peer.insert(peer, mine);
        Ok(())
    }

    fn remove(&mut self, peer: u64, size: u64) {
        self.total = self.total.saturating_sub(size);
        if let Some(m) = self.by_peer.get_mut(&peer) {
            *m = m.saturating_sub(size);
            if *m == 0 {
                self.by_peer.remove(&peer);
            }
        }
    }
}

/// Where a region starting at `start` of `memory` begins once the inline part just before it (`out`'s last part) is
/// folded in: when that part holds exactly the bytes that precede the region in memory (a field's key and length
/// written in front of its payload, as loans and echoes are sent), it is dropped and the region starts that much
/// earlier, so the message's field lies in one piece with its key (read in place by bindings that parse pieces).
fn fold(out: &mut Vec<Bytes>, memory: &[u8], start: usize) -> usize {
    let Some(head) = out.last() else { return start };
    let k = head.len();
    if k == 0 || k > start || memory.get(start - k..start) != Some(&head[..]) {
        return start;
    }
    out.pop();
    start - k
}

/// A key for a peer whose pid the kernel did not tell (another pid namespace): each such session counts as a peer
/// of its own, above the range of pids.
static UNKNOWN_PEERS: AtomicU64 = AtomicU64::new(1 << 32);

/// A resolved reference: the message's parts, and the peer segments they lie in (to check afterwards that none
/// was shrunk under the reader).
pub(crate) struct Resolved {
    pub(crate) parts: Vec<Bytes>,
    pub(crate) segments: Vec<Arc<PeerSegment>>,
}

/// The receiving half of one session (see the module docs).
pub(super) struct Receiver {
    recorder: Arc<Recorder>,
    outbox: Arc<Outbox>,
    /// The peer's pid as the kernel reported it at the handshake: a named segment must have been created by it.
    peer_pid: u32,
    /// Whose share of the process-wide cap this session's mappings count against: the peer's pid, or a key of its
    /// own when the pid is unknown.
    peer_key: u64,
    /// The peer's segments we have mapped.
    peer: AttachCache<u32>,
    /// Their bytes, as counted against the process-wide cap.
    mapped: AtomicU64,
    /// Segment ids whose registration we refused (bounded): messages naming them are not held back.
    refused: Mutex<HashSet<u32>>,
    /// Segment ids the peer forgot (the last [`MAX_FORGOTTEN_IDS`]): never registered again in this session, and
    /// references to them fail at once instead of being held back.
    forgotten: Mutex<Forgotten>,
    /// Woken by every registration (accepted or refused), and when the session closes.
    registrations: Arc<Notify>,
    /// Live regions of the peer's memory: slices of them are sent back without a copy.
    regions: Mutex<Vec<Weak<Incoming>>>,
    /// Regions we sent back to the peer, kept until it answers `Returned`, each with the message it went in (in a
    /// session that numbers calls).
    sent_back: Mutex<ByRegion<SentBack>>,
}

/// A region of the peer's we sent back, and the message it went in (in a session that numbers calls).
type SentBack = (Arc<Incoming>, Option<Arc<MessageTag>>);

impl Receiver {
    pub(super) fn new(recorder: Arc<Recorder>, outbox: Arc<Outbox>, peer_pid: u32) -> Receiver {
        Receiver {
            recorder,
            outbox,
            peer_pid,
            peer_key: if peer_pid != 0 { u64::from(peer_pid) } else { UNKNOWN_PEERS.fetch_add(1, Ordering::Relaxed) },
            peer: AttachCache::default(),
            mapped: AtomicU64::new(0),
            refused: Mutex::default(),
            forgotten: Mutex::default(),
            registrations: Arc::new(Notify::new()),
            regions: Mutex::default(),
            sent_back: Mutex::default(),
        }
    }

    /// The peer's segments mapped here and their bytes.
    pub(super) fn mapped(&self) -> (usize, u64) {
        let st = self.peer.stats();
        (st.segments, st.bytes)
    }

    /// Regions sent back and not yet answered with `Returned`.
    pub(super) fn sent_back_count(&self) -> usize {
        lock(&self.sent_back).values().map(Vec::len).sum()
    }

    /// Whether `data` lies inside one of the peer's segments we have mapped.
    pub(super) fn maps(&self, data: &[u8]) -> bool {
        self.peer.contains(data)
    }

    /// Woken when the peer registers (or we refuse) a segment, or the session closes.
    pub(super) fn registrations(&self) -> &Arc<Notify> {
        &self.registrations
    }

    /// Drops every mapping and everything kept for the peer, and wakes every waiter.
    pub(super) fn close(&self) {
        let sent_back = std::mem::take(&mut *lock(&self.sent_back));
        drop(sent_back);
        lock(&self.regions).clear();
        lock(&self.refused).clear();
        *lock(&self.forgotten) = Forgotten::default();
        self.peer.clear();
        lock(&MAPPED).remove(self.peer_key, self.mapped.swap(0, Ordering::AcqRel));
        self.registrations.notify_waiters();
    }

    /// A `Register` from the peer: map the segment (or refuse it), and answer `Registered` either way.
    ///
    /// # Errors
    ///
    /// The answer could not be queued: the session is over.
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
                lock(&self.refused).remove(&reg.segment);
                String::new()
            }
            Err(e) => {
                self.recorder.record_both(Event::PeerRefusal);
                tracing::debug!(error = %e, "refused a segment from the peer");
                let mut refused = lock(&self.refused);
                if refused.len() < MAX_PEER_SEGMENTS {
                    refused.insert(reg.segment);
                }
                e
            }
        };
        self.registrations.notify_waiters();
        self.outbox
            .send(Kind::Registered(v1::Registered { segment: reg.segment, error }), None)
            .map_err(|e| format!("side channel: {}", std::io::Error::from(e)))
    }

    /// Maps a segment the peer registered, within the caps: per session, per peer process (its share of the
    /// process's), per process. A named segment (POSIX, System V) must have been created by the peer process itself:
    /// a name or id alone proves nothing.
    fn accept_segment(&self, segment: u32, len: u64, handle: SegmentHandle) -> Result<(), String> {
        if self.peer.get(&segment).is_some() {
            return Err("segment id already registered in this session".into());
        }
        if lock(&self.forgotten).contains(segment) {
            return Err("segment id forgotten earlier in this session (ids are not reused)".into());
        }
        let st = self.peer.stats();
        if st.segments >= MAX_PEER_SEGMENTS {
            return Err(format!("too many segments registered (at most {MAX_PEER_SEGMENTS} per session)"));
        }
        if self.peer_pid == 0 && !matches!(handle, SegmentHandle::Memfd(_)) {
            // Whether the peer created a named segment is judged by its pid, which another pid namespace hides.
            return Err("named segments need the peer's pid, which its pid namespace hides: send memfds".into());
        }
        let seg = PeerSegment::open_created_by(handle, len, self.peer_pid).map_err(|e| e.to_string())?;
        // The real size counts, not the claim: the whole segment is mapped.
        let size = seg.len() as u64;
        if st.bytes.saturating_add(size) > MAX_SESSION_PEER_BYTES {
            return Err(format!("segments of more than {MAX_SESSION_PEER_BYTES} bytes in one session"));
        }
        lock(&MAPPED).add(self.peer_key, size)?;
        self.mapped.fetch_add(size, Ordering::AcqRel);
        self.peer.insert(segment, seg);
        if self.outbox.is_closed() {
            // Closed meanwhile: `close` may have cleared the cache before this insert.
            self.unmap(segment);
        }
        Ok(())
    }

    /// The peer's segment no longer exists: drop our mapping (readers keep theirs until they are done), and
    /// remember the id as retired.
    pub(super) fn on_forget(&self, segment: u32) {
        lock(&self.forgotten).insert(segment);
        self.unmap(segment);
    }

    /// Drops our mapping of `segment` and its bytes from the caps.
    fn unmap(&self, segment: u32) {
        if let Some(seg) = self.peer.get(&segment)
            && self.peer.detach(&segment)
        {
            let size = seg.len() as u64;
            let before = self.mapped.fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| m.checked_sub(size));
            if before.is_ok() {
                lock(&MAPPED).remove(self.peer_key, size);
            }
        }
    }

    /// Whether a reference names a segment of the peer's whose registration has not arrived yet (neither mapped
    /// nor refused). The body wrappers hold such a message back until it has (protocol §6).
    pub(super) fn awaits_registration(&self, r: &Reference) -> bool {
        if self.outbox.is_closed() {
            return false;
        }
        let refused = lock(&self.refused);
        let forgotten = lock(&self.forgotten);
        r.parts.iter().any(|p| match &p.kind {
            Some(part::Kind::Sender(reg)) => {
                self.peer.get(&reg.segment).is_none()
                    && !refused.contains(&reg.segment)
                    && !forgotten.contains(reg.segment)
            }
            _ => false,
        })
    }

    /// Resolves a reference the peer sent into the parts of the message, zero-copy: `sender` parts over the peer's
    /// segments (released when their last `Bytes` is dropped), `receiver` parts over our own buffers, which `ours`
    /// finds among those the peer holds.
    ///
    /// # Errors
    ///
    /// The status of protocol §9 for a reference that breaks a rule; nothing is held or released then.
    pub(super) fn resolve(
        &self,
        r: Reference,
        ours: impl Fn(u32, u32) -> Option<Arc<Outgoing>>,
    ) -> Result<Resolved, tonic::Status> {
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
            let part = match p.kind {
                None => return Err(Status::invalid_argument("shmgrpc reference part without a kind")),
                Some(part::Kind::Inline(b)) => b,
                Some(part::Kind::Sender(reg)) => {
                    let seg = self.peer.get(&reg.segment).ok_or_else(|| {
                        Status::invalid_argument("shmgrpc reference to a segment the peer never registered")
                    })?;
                    let (start, end) = crate::segment::check_range(seg.backend(), reg.offset, reg.len, seg.len())
                        .map_err(|e| Status::out_of_range(format!("shmgrpc reference out of range: {e}")))?;
                    let start = fold(&mut out, seg.as_slice(), start);
                    segments.push(seg.clone());
                    let incoming = Arc::new(Incoming {
                        seg,
                        segment: reg.segment,
                        generation: reg.generation,
                        start,
                        end,
                        outbox: Arc::downgrade(&self.outbox),
                    });
                    {
                        let mut regions = lock(&self.regions);
                        regions.retain(|w| w.strong_count() > 0);
                        regions.push(Arc::downgrade(&incoming));
                    }
                    Bytes::from_owner(IncomingView(incoming))
                }
                Some(part::Kind::Receiver(reg)) => {
                    let buf = ours(reg.segment, reg.generation).ok_or_else(|| {
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
                    let start = fold(&mut out, &buf.lease, start);
                    Bytes::from_owner(OutgoingView(buf)).slice(start..end)
                }
            };
            out.push(part);
        }
        // We hold our own buffers again through the Bytes just made: the peer may drop its holds.
        for (segment, generation) in returned {
            if let Err(e) = self.outbox.send(Kind::Returned(v1::Returned { segment, generation }), None) {
                tracing::debug!(?e, "returned not sent; the session is closing");
            }
        }
        Ok(Resolved { parts: out, segments })
    }

    /// Keeps regions we sent back as `receiver` parts until the peer answers `Returned`.
    pub(super) fn keep_sent_back(&self, regions: Vec<Arc<Incoming>>, tag: Option<&Arc<MessageTag>>) {
        if regions.is_empty() {
            return;
        }
        let mut sent_back = lock(&self.sent_back);
        for region in regions {
            sent_back.entry((region.segment, region.generation)).or_default().push((region, tag.cloned()));
        }
    }

    /// Drops the regions kept for the message `tag` names (it never reached the peer), and only those.
    pub(super) fn cancel_tagged(&self, tag: &Arc<MessageTag>) {
        let taken = take_tagged(
            &mut lock(&self.sent_back),
            tag,
            |k| match k {
                part::Kind::Receiver(r) => Some(r),
                _ => None,
            },
            |(_, t): &SentBack| t.as_ref(),
        );
        // Dropped outside the lock: dropping an `Incoming` queues a frame.
        drop(taken);
    }

    /// Copies `len` bytes at `offset` of the peer's segment from a region we sent back under `(segment,
    /// generation)`, for a message that goes inline after all; `None` if no such region is kept or the range is not
    /// inside it.
    pub(super) fn copy_sent_back(&self, r: &v1::Region, out: &mut Vec<u8>) -> Option<()> {
        let sent_back = lock(&self.sent_back);
        let (region, _) = sent_back.get(&(r.segment, r.generation))?.first()?;
        let (start, end) = crate::segment::check_range(region.seg.backend(), r.offset, r.len, region.seg.len()).ok()?;
        if start < region.start || end > region.end {
            return None;
        }
        out.extend_from_slice(&region.seg.as_slice()[start..end]);
        Some(())
    }

    /// Drops the regions kept for a reference that never reached the peer (it went inline instead): one per
    /// `receiver` part. Their releases follow once nothing else reads them.
    pub(super) fn cancel_sent_back(&self, parts: &[v1::Part]) {
        let taken = take_for_parts(&mut lock(&self.sent_back), parts, |k| match k {
            part::Kind::Receiver(r) => Some(r),
            _ => None,
        });
        // Dropped outside the lock: dropping an `Incoming` queues a frame.
        drop(taken);
    }

    /// The peer resolved a `receiver` part of ours: drop one region kept for it (its release follows once nothing
    /// else reads it). One the peer was never sent is counted as refused.
    pub(super) fn on_returned(&self, segment: u32, generation: u32) {
        let taken = take_one(&mut lock(&self.sent_back), (segment, generation));
        // Dropped outside the lock: dropping an `Incoming` queues a frame.
        if taken.is_none() {
            self.recorder.record_both(Event::BadRelease);
            self.recorder.record_both(Event::PeerRefusal);
            tracing::debug!(segment, "refused a return of a region we did not send back");
        }
    }
}

impl Drop for Receiver {
    /// Gives the mappings' bytes back to the caps even if the session never closed it.
    fn drop(&mut self) {
        self.close();
    }
}

/// The ids a peer forgot, oldest first, at most [`MAX_FORGOTTEN_IDS`] of them.
#[derive(Default)]
struct Forgotten {
    ids: HashSet<u32>,
    order: VecDeque<u32>,
}

impl Forgotten {
    fn insert(&mut self, id: u32) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            if self.order.len() > MAX_FORGOTTEN_IDS
                && let Some(oldest) = self.order.pop_front()
            {
                self.ids.remove(&oldest);
            }
        }
    }

    fn contains(&self, id: u32) -> bool {
        self.ids.contains(&id)
    }
}

impl PeerRegions for Receiver {
    fn any(&self) -> bool {
        let mut regions = lock(&self.regions);
        regions.retain(|w| w.strong_count() > 0);
        !regions.is_empty()
    }

    fn locate(&self, s: &[u8]) -> Option<(Arc<Incoming>, u64)> {
        lock(&self.regions).iter().filter_map(Weak::upgrade).find_map(|region| {
            let offset = region.contains(s)?;
            Some((region, offset))
        })
    }
}

#[cfg(test)]
mod tests;
