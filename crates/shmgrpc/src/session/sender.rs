//! The sending half of a session: messages encoded into our pool buffers, segments registered with the peer
//! without a round trip, holds until the peer releases, and the in-flight window that bounds those holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tokio::sync::Notify;

use super::loan::{Incoming, Loan, Located, Outgoing};
use super::{ByRegion, Session, lock, take_one};
use crate::pool::Lease;
use crate::proto::v1::{self, part};
use crate::protocol::MAX_INLINE;
use crate::segment::SegmentHandle;
use crate::stats::{Event, Fallback};
use crate::wire::{Kind, Reference};

/// What the peer made of one of our segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    /// `Register` queued at this instant: references may name the segment at once (protocol §5).
    Sent(Instant),
    /// The peer answered `Registered` without an error.
    Acknowledged,
    /// The peer answered `Registered` with an error: the segment is not used with this peer again.
    Refused,
}

/// A hold: one `sender` part the peer may read, the bytes it covers, and when it was made.
type Hold = (Arc<Outgoing>, u64, Instant);

/// The sender's bookkeeping of one session.
pub(super) struct SenderState {
    registrations: Mutex<HashMap<u32, Registration>>,
    /// Our buffers the peer may read: one entry per `sender` part sent and not yet released.
    holds: Mutex<ByRegion<Hold>>,
    /// Bytes the holds cover.
    held: AtomicU64,
    /// Woken by every release, and when the session closes.
    pub(super) released: Arc<Notify>,
    /// Live loans made for this session: slices of them are sent without a copy.
    loans: Mutex<Vec<Weak<Outgoing>>>,
    /// The pool's eviction count when we last looked for dropped buffers the peer still maps.
    seen_evictions: AtomicU64,
    /// The pool's return count when an allocation last failed for lack of budget (`u64::MAX`: never).
    short_at: AtomicU64,
}

impl SenderState {
    pub(super) fn new(evictions: u64) -> Self {
        SenderState {
            registrations: Mutex::default(),
            holds: Mutex::default(),
            held: AtomicU64::new(0),
            released: Arc::new(Notify::new()),
            loans: Mutex::default(),
            seen_evictions: AtomicU64::new(evictions),
            short_at: AtomicU64::new(u64::MAX),
        }
    }

    /// Holds, held bytes, registered segments.
    pub(super) fn figures(&self) -> (usize, u64, usize) {
        let holds = lock(&self.holds).values().map(Vec::len).sum();
        let registered = lock(&self.registrations).values().filter(|r| !matches!(r, Registration::Refused)).count();
        (holds, self.held.load(Ordering::Acquire), registered)
    }

    /// Drops every hold (the buffers go back to the pool once nothing local reads them); returns how many.
    pub(super) fn close(&self) -> usize {
        let holds = std::mem::take(&mut *lock(&self.holds));
        let back = holds.values().map(Vec::len).sum();
        drop(holds);
        self.held.store(0, Ordering::Release);
        lock(&self.loans).clear();
        lock(&self.registrations).clear();
        self.released.notify_waiters();
        back
    }
}

/// Holds and returns taken while building one reference, committed only if the whole reference is built.
#[derive(Default)]
struct Pending {
    holds: Vec<(Arc<Outgoing>, u64)>,
    returning: Vec<Arc<Incoming>>,
}

impl Session {
    /// A loan of `len` bytes from this session's pool; ordinary memory when the session is closed or the pool is
    /// out of budget.
    pub(crate) fn loan(self: &Arc<Self>, len: usize) -> Loan {
        if !self.is_alive() {
            return Loan::heap(len);
        }
        match self.params.pool.try_alloc(len) {
            Ok(lease) => Loan::shared(lease, Arc::downgrade(self)),
            Err(e) => {
                tracing::debug!(error = %e, "loan from ordinary memory");
                self.params.recorder.record_both(Event::Fallback(Fallback::PoolExhausted));
                Loan::heap(len)
            }
        }
    }

    pub(super) fn note_loan(&self, buf: &Arc<Outgoing>) {
        let mut loans = lock(&self.sender.loans);
        loans.retain(|w| w.strong_count() > 0);
        loans.push(Arc::downgrade(buf));
    }

    /// Finds `s` in one of our live loans or one of the peer's live regions.
    pub(crate) fn locate(&self, s: &[u8]) -> Option<Located> {
        for buf in lock(&self.sender.loans).iter().filter_map(Weak::upgrade) {
            if let Some(offset) = buf.contains(s) {
                return Some(Located::Ours { buf, offset, len: s.len() });
            }
        }
        self.locate_region(s)
    }

    /// Whether anything the encoder could refer to without a copy is alive.
    fn has_shared_candidates(&self) -> bool {
        let mut loans = lock(&self.sender.loans);
        loans.retain(|w| w.strong_count() > 0);
        !loans.is_empty() || self.has_live_regions()
    }

    /// Whether the peer holds as many bytes of ours as the window allows (sending then waits, protocol §7).
    pub(crate) fn window_full(&self) -> bool {
        self.sender.held.load(Ordering::Acquire) >= self.params.window
    }

    /// How long sending waits for the window before going inline.
    pub(crate) fn window_wait(&self) -> std::time::Duration {
        self.params.window_wait
    }

    /// Woken by every release of the peer's, and when the session closes.
    pub(crate) fn released(&self) -> &Arc<Notify> {
        &self.sender.released
    }

    /// Encodes `item` (of `len` encoded bytes) for the peer and returns the reference to send in its place.
    ///
    /// Slices that already lie in shared memory (our loans, the peer's regions) are referred to where they are;
    /// everything else is encoded straight into a pool buffer. Any failure is a reason to send inline instead, and
    /// then nothing stays held. Never waits on the peer: a new segment's registration is queued and the reference
    /// may overtake it (the receiver holds the message back until it has the segment).
    pub(crate) fn encode_to_shm<M: Message>(self: &Arc<Self>, item: &M, len: usize) -> Result<Reference, Fallback> {
        if !self.is_alive() {
            return Err(Fallback::SessionClosed);
        }
        let mut pending = Pending::default();
        let parts = if self.has_shared_candidates() {
            let mut buf = SplitBuf::new(self, len.min(MAX_INLINE));
            item.encode(&mut buf).expect("a growing buffer never runs out");
            let mut parts = Vec::new();
            let mut inline_budget = MAX_INLINE;
            for piece in buf.finish() {
                parts.push(match piece {
                    Piece::Inline(v) if v.len() <= inline_budget => {
                        inline_budget -= v.len();
                        part::Kind::Inline(v.into())
                    }
                    Piece::Inline(v) => {
                        let mut lease = self.alloc(v.len())?;
                        lease.copy_from_slice(&v);
                        self.refer(Outgoing::new(lease), 0, v.len(), &mut pending)?
                    }
                    Piece::Owned(lease) => {
                        let n = lease.len();
                        self.refer(Outgoing::new(lease), 0, n, &mut pending)?
                    }
                    Piece::Shared(Located::Ours { buf, offset, len }) => self.refer(buf, offset, len, &mut pending)?,
                    Piece::Shared(Located::Theirs { region, offset, len }) => {
                        let r = v1::Region { segment: region.segment, generation: region.generation, offset, len };
                        pending.returning.push(region);
                        part::Kind::Receiver(r)
                    }
                });
            }
            parts
        } else {
            let mut lease = self.alloc(len)?;
            {
                let mut dst: &mut [u8] = &mut lease;
                item.encode(&mut dst).expect("the lease holds exactly encoded_len bytes");
            }
            vec![self.refer(Outgoing::new(lease), 0, len, &mut pending)?]
        };
        // Commit: from here the peer may read and must release.
        {
            let mut holds = lock(&self.sender.holds);
            let now = Instant::now();
            for (buf, n) in pending.holds {
                self.sender.held.fetch_add(n, Ordering::AcqRel);
                holds.entry((buf.lease.id(), buf.lease.generation())).or_default().push((buf, n, now));
            }
        }
        self.keep_returning(pending.returning);
        Ok(Reference {
            session: Bytes::copy_from_slice(&self.id),
            from_server: self.role == super::Role::Server,
            parts: parts.into_iter().map(|k| v1::Part { kind: Some(k) }).collect(),
        })
    }

    /// A pool buffer for sending, never waiting (the encoder runs on a poll path). When the budget is used up, the
    /// pool's return count is noted, so the next call waits asynchronously for a return before its first message
    /// (see [`Session::pool_short`]).
    pub(crate) fn alloc(&self, len: usize) -> Result<Lease, Fallback> {
        let returned = self.params.pool.returned();
        self.params.pool.try_alloc(len).map_err(|_| {
            self.sender.short_at.store(returned, Ordering::Release);
            Fallback::PoolExhausted
        })
    }

    /// Whether the last allocation failed for lack of budget and no buffer has come back to the pool since, while
    /// the configuration allows a wait for one.
    pub(crate) fn pool_short(&self) -> bool {
        !self.params.exhausted_wait.is_zero()
            && self.sender.short_at.load(Ordering::Acquire) == self.params.pool.returned()
    }

    /// How long a call may wait for a buffer to come back before its messages go inline.
    pub(crate) fn exhausted_wait(&self) -> std::time::Duration {
        self.params.exhausted_wait
    }

    /// Woken whenever a buffer comes back to the pool.
    pub(crate) fn pool_returns(&self) -> &Arc<Notify> {
        self.params.pool.returns()
    }

    /// A `sender` part for `len` bytes at `offset` of `buf`, registering the segment first if the peer lacks it.
    fn refer(
        &self,
        buf: Arc<Outgoing>,
        offset: usize,
        len: usize,
        pending: &mut Pending,
    ) -> Result<part::Kind, Fallback> {
        self.ensure_registered(&buf.lease)?;
        let lease = &buf.lease;
        // Offsets on the wire are in the segment, where a slab slot lies at its own offset.
        let offset = (lease.offset() + offset) as u64;
        let region = v1::Region { segment: lease.id(), generation: lease.generation(), offset, len: len as u64 };
        pending.holds.push((buf, len as u64));
        Ok(part::Kind::Sender(region))
    }

    /// Tells the peer to drop its mappings of our buffers that the pool has since dropped (otherwise the peer's
    /// mapping would keep their memory alive). Runs only when the pool's eviction count moved.
    fn forget_evicted(&self) {
        let evictions = self.params.pool.evictions();
        if self.sender.seen_evictions.swap(evictions, Ordering::Relaxed) == evictions {
            return;
        }
        let gone: Vec<(u32, Registration)> = {
            let mut regs = lock(&self.sender.registrations);
            let gone: Vec<(u32, Registration)> =
                regs.iter().filter(|(id, _)| !self.params.pool.exists(**id)).map(|(&id, &r)| (id, r)).collect();
            for (id, _) in &gone {
                regs.remove(id);
            }
            gone
        };
        for (segment, reg) in gone {
            if reg != Registration::Refused
                && let Err(e) = self.send(Kind::Forget(v1::Forget { segment }), None)
            {
                tracing::debug!(error = %e, "forget not sent; the session is closing");
            }
        }
    }

    /// Makes sure the peer has our segment: the first time, queues its `Register` (with the memfd, or its name)
    /// and returns at once (protocol §5: no round trip).
    fn ensure_registered(&self, lease: &Lease) -> Result<(), Fallback> {
        self.forget_evicted();
        let id = lease.id();
        {
            let mut regs = lock(&self.sender.registrations);
            match regs.get(&id) {
                Some(Registration::Sent(_) | Registration::Acknowledged) => return Ok(()),
                Some(Registration::Refused) => return Err(Fallback::RegistrationFailed),
                None => {}
            }
            regs.insert(id, Registration::Sent(Instant::now()));
        }
        let len = lease.segment_len() as u64;
        let register = |source| Kind::Register(v1::Register { segment: id, len, source });
        let sent = match lease.share() {
            Ok(SegmentHandle::Memfd(fd)) => self.send(register(None), Some(fd)),
            Ok(SegmentHandle::Posix(name)) => {
                self.send(register(Some(v1::register::Source::PosixName(name.as_str().to_string()))), None)
            }
            Ok(SegmentHandle::SysV(sid)) => self.send(register(Some(v1::register::Source::SysvId(sid.as_raw()))), None),
            Err(e) => {
                tracing::debug!(error = %e, "segment not shareable; sending inline");
                lock(&self.sender.registrations).insert(id, Registration::Refused);
                return Err(Fallback::RegistrationFailed);
            }
        };
        sent.map_err(|_| {
            lock(&self.sender.registrations).remove(&id);
            Fallback::SessionClosed
        })
    }

    /// The peer's answer to a registration: an error marks the segment as unusable with this peer (messages that
    /// already named it fail there with a status; later ones go inline or use other buffers).
    pub(super) fn on_registered(&self, ack: v1::Registered) {
        if ack.error.is_empty() {
            let mut regs = lock(&self.sender.registrations);
            if let Some(r) = regs.get_mut(&ack.segment)
                && let Registration::Sent(at) = *r
            {
                *r = Registration::Acknowledged;
                drop(regs);
                self.params.recorder.registration_latency(at.elapsed());
            }
            return;
        }
        tracing::debug!(error = %ack.error, "the peer refused one of our segments");
        let mut regs = lock(&self.sender.registrations);
        if let Some(r) = regs.get_mut(&ack.segment) {
            *r = Registration::Refused;
        }
    }

    /// The peer no longer reads a `sender` part: one hold goes, and with it its bytes from the window.
    pub(super) fn on_release(&self, segment: u32, generation: u32) {
        let taken = take_one(&mut lock(&self.sender.holds), (segment, generation));
        match taken {
            Some((buf, n, at)) => {
                self.params.recorder.release_latency(at.elapsed());
                self.sender.held.fetch_sub(n, Ordering::AcqRel);
                // The buffer may go back to the pool here, outside every session lock.
                drop(buf);
                self.sender.released.notify_waiters();
            }
            None => {
                self.params.recorder.record_both(Event::BadRelease);
                self.params.recorder.record_both(Event::PeerRefusal);
                tracing::debug!(segment, "refused a release of a buffer the peer does not hold");
            }
        }
    }

    /// Our buffer held for the peer under `(segment, generation)`, for a `receiver` part the peer sent back.
    pub(super) fn held_buffer(&self, segment: u32, generation: u32) -> Option<Arc<Outgoing>> {
        lock(&self.sender.holds).get(&(segment, generation)).and_then(|v| v.first().map(|(b, _, _)| b.clone()))
    }
}

/// Slices shorter than this are never looked up as loans or peer regions: a copy is cheaper.
const MIN_LOCATE: usize = 4096;

/// A slice at least this long that is not in shared memory yet is copied straight into a pool buffer of its own
/// (one copy), rather than into the inline bytes (which would need a second copy into shared memory).
const MIN_OWN: usize = 64 * 1024;

/// One piece of an encoded message.
pub(crate) enum Piece {
    /// Bytes the encoder wrote.
    Inline(Vec<u8>),
    /// A slice that already lies in shared memory (one of our loans, or a region of the peer's).
    Shared(Located),
    /// A large slice copied into a pool buffer of its own.
    Owned(Lease),
}

/// A `BufMut` that writes like a `Vec<u8>`, except that a slice lying in shared memory this session can refer to
/// becomes a [`Piece::Shared`] instead of being copied.
pub(crate) struct SplitBuf<'a> {
    session: &'a Arc<Session>,
    current: Vec<u8>,
    pieces: Vec<Piece>,
}

impl<'a> SplitBuf<'a> {
    pub(crate) fn new(session: &'a Arc<Session>, capacity: usize) -> Self {
        SplitBuf { session, current: Vec::with_capacity(capacity), pieces: Vec::new() }
    }

    /// Takes `s` as a piece of its own if it is large: referred to where it is if it already lies in shared
    /// memory, else copied once into a pool buffer. False: the caller copies it into the inline bytes.
    fn try_share(&mut self, s: &[u8]) -> bool {
        if s.len() < MIN_LOCATE {
            return false;
        }
        let piece = match self.session.locate(s) {
            Some(loc) => Piece::Shared(loc),
            None if s.len() >= MIN_OWN => match self.session.alloc(s.len()) {
                Ok(mut lease) => {
                    lease.copy_from_slice(s);
                    Piece::Owned(lease)
                }
                Err(_) => return false,
            },
            None => return false,
        };
        if !self.current.is_empty() {
            self.pieces.push(Piece::Inline(std::mem::take(&mut self.current)));
        }
        self.pieces.push(piece);
        true
    }

    /// The pieces, in order.
    pub(crate) fn finish(mut self) -> Vec<Piece> {
        if !self.current.is_empty() {
            self.pieces.push(Piece::Inline(self.current));
        }
        self.pieces
    }
}

// SAFETY: every method delegates to the `Vec<u8>` being written, which upholds `BufMut`'s contract; the overridden
// `put` and `put_slice` only add whole bytes through `Vec`'s own safe methods.
unsafe impl BufMut for SplitBuf<'_> {
    fn remaining_mut(&self) -> usize {
        self.current.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: forwarded unchanged: the caller guarantees `cnt` bytes of `chunk_mut` were initialised.
        unsafe { self.current.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        self.current.chunk_mut()
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        let n = src.remaining();
        if src.chunk().len() == n && self.try_share(src.chunk()) {
            src.advance(n);
            return;
        }
        self.current.put(src);
    }

    fn put_slice(&mut self, src: &[u8]) {
        if !self.try_share(src) {
            self.current.extend_from_slice(src);
        }
    }
}
