//! The sending half of a session: messages encoded into our pool buffers, segments registered with the peer
//! without a round trip, holds until the peer releases, and the in-flight window that bounds those holds.
//!
//! [`Sender`] owns that state and knows nothing of the receiving half: frames go out through the session's
//! [`Outbox`], and the peer's regions it may echo without a copy are lent to [`Sender::encode`] as
//! [`PeerRegions`]. Its unit tests (below) drive it alone, reading the frames it queues. The encoder's buffer for
//! messages that may hold slices already in shared memory is `split.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::Notify;

use super::calls::{Calls, MessageTag};
use super::loan::{Incoming, Located, Outgoing, PeerRegions};
use super::outbox::Outbox;
use super::split::{Piece, SplitBuf};
use super::{ByRegion, take_for_parts, take_one, take_tagged};
use crate::config::SessionParams;
use crate::pool::{Lease, Tenant};
use crate::proto::v1::{self, part};
use crate::protocol::MAX_INLINE;
use crate::segment::SegmentHandle;
use crate::stats::{Event, Fallback, Recorder};
use crate::sync::lock;
use crate::wire::Kind;

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

/// Where a set of our segments stands with the peer, for a message that names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The peer mapped every one: the message may go.
    Acknowledged,
    /// At least one answer has not come yet (and none was an error).
    Pending,
    /// The peer refused one (or we gave up waiting for its answer): the message must go inline.
    Refused,
}

/// A peer that holds at least this fraction of the pool's budget is a heavy holder (see [`Sender::alloc`]).
const HEAVY_SHARE: u64 = 16;

/// The fraction of the pool's budget left free of leases for peers that hold little.
const RESERVED_FOR_LIGHT: u64 = 4;

/// After a refusal, registrations of new segments pause for a while (doubling up to [`MAX_BACKOFF`]), so that a
/// peer that cannot or will not map our segments costs neither it nor us a new segment and a round trip per
/// message: messages that would need a new segment go inline at once meanwhile.
#[derive(Debug)]
struct Backoff {
    until: Option<Instant>,
    next: Duration,
}

const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Default for Backoff {
    fn default() -> Self {
        Backoff { until: None, next: FIRST_BACKOFF }
    }
}

/// A hold: one `sender` part the peer may read, the bytes it covers, when it was made, and the message it belongs
/// to (in a session that numbers calls).
type Hold = (Arc<Outgoing>, u64, Instant, Option<Arc<MessageTag>>);

/// A message encoded for the peer: the reference's parts, the peer's regions it sends back (`receiver` parts),
/// which the receiving half keeps until the peer answers `Returned`, and the segments it names that the peer has not
/// acknowledged (answer pending, or refused while the message was being copied): the message waits for those
/// answers before it leaves, or goes inline.
pub(super) struct Encoded {
    pub(super) parts: Vec<v1::Part>,
    pub(super) sent_back: Vec<Arc<Incoming>>,
    pub(super) unacknowledged: Vec<u32>,
    /// The message's tag, when its call is numbered and it has anything the peer must answer.
    pub(super) tag: Option<Arc<MessageTag>>,
    /// The peer ended the call before this message (`CallEnd`): it never arrives, and what it holds must go.
    pub(super) lost: bool,
}

/// The sending half of one session (see the module docs).
pub(super) struct Sender {
    params: SessionParams,
    /// This session's tenancy of the pool: our buffers come only from segments no other session's peer was given.
    tenant: Tenant,
    outbox: Arc<Outbox>,
    registrations: Mutex<HashMap<u32, Registration>>,
    /// Our buffers the peer may read: one entry per `sender` part sent and not yet released.
    holds: Mutex<ByRegion<Hold>>,
    /// Bytes the holds cover.
    held: AtomicU64,
    /// Woken by every release, every answer to a registration, and when the session closes.
    progress: Arc<Notify>,
    /// Pause of new registrations after a refusal.
    backoff: Mutex<Backoff>,
    /// Which message of which call our references stand for (protocol version 3).
    calls: Mutex<Calls>,
    /// Live loans made for this session: slices of them are sent without a copy.
    loans: Mutex<Vec<Weak<Outgoing>>>,
    /// The pool's eviction count when we last looked for dropped buffers the peer still maps.
    seen_evictions: AtomicU64,
    /// The pool's return count when an allocation last failed for lack of budget (`u64::MAX`: never).
    short_at: AtomicU64,
}

/// Holds and returns taken while building one reference, committed only if the whole reference is built.
#[derive(Default)]
struct Pending {
    holds: Vec<(Arc<Outgoing>, u64)>,
    sent_back: Vec<Arc<Incoming>>,
    /// Our segments the reference names.
    segments: Vec<u32>,
}

impl Sender {
    pub(super) fn new(params: SessionParams, outbox: Arc<Outbox>) -> Sender {
        let evictions = params.pool.evictions();
        Sender {
            tenant: params.pool.tenant(),
            params,
            outbox,
            registrations: Mutex::default(),
            holds: Mutex::default(),
            held: AtomicU64::new(0),
            progress: Arc::new(Notify::new()),
            backoff: Mutex::default(),
            calls: Mutex::default(),
            loans: Mutex::default(),
            seen_evictions: AtomicU64::new(evictions),
            short_at: AtomicU64::new(u64::MAX),
        }
    }

    pub(super) fn params(&self) -> &SessionParams {
        &self.params
    }

    fn recorder(&self) -> &Recorder {
        &self.params.recorder
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
        lock(&self.calls).clear();
        // The peer may keep mapping our segments: none of them is used for anyone again.
        self.params.pool.retire(self.tenant);
        self.progress.notify_waiters();
        back
    }

    /// A pool buffer for a loan, never waiting; `None` (counted as a fallback) when the pool has no room for this
    /// peer (see [`Sender::alloc`]).
    pub(super) fn loan_lease(&self, len: usize) -> Option<Lease> {
        match self.alloc(len) {
            Ok(lease) => Some(lease),
            Err(reason) => {
                tracing::debug!(%reason, "loan from ordinary memory");
                self.recorder().record_both(Event::Fallback(reason));
                None
            }
        }
    }

    /// Remembers a frozen loan: slices of it are then sent without a copy.
    pub(super) fn note_loan(&self, buf: &Arc<Outgoing>) {
        let mut loans = lock(&self.loans);
        loans.retain(|w| w.strong_count() > 0);
        loans.push(Arc::downgrade(buf));
    }

    /// Finds `s` in one of our live loans or one of the peer's live regions.
    fn locate(&self, s: &[u8], peer: &dyn PeerRegions) -> Option<Located> {
        for buf in lock(&self.loans).iter().filter_map(Weak::upgrade) {
            if let Some(offset) = buf.contains(s) {
                return Some(Located::Ours { buf, offset, len: s.len() });
            }
        }
        peer.locate(s).map(|(region, offset)| Located::Theirs { region, offset, len: s.len() as u64 })
    }

    /// Whether anything the encoder could refer to without a copy is alive.
    fn has_shared_candidates(&self, peer: &dyn PeerRegions) -> bool {
        let mut loans = lock(&self.loans);
        loans.retain(|w| w.strong_count() > 0);
        !loans.is_empty() || peer.any()
    }

    /// Bytes the peer holds (what the window limits).
    pub(super) fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// Woken by every release of the peer's, every answer to a registration, and when the session closes.
    pub(super) fn progress(&self) -> &Arc<Notify> {
        &self.progress
    }

    /// Where `segments` stand with the peer (see [`Outcome`]).
    pub(super) fn outcome(&self, segments: &[u32]) -> Outcome {
        let regs = lock(&self.registrations);
        let mut outcome = Outcome::Acknowledged;
        for id in segments {
            match regs.get(id) {
                Some(Registration::Acknowledged) => {}
                Some(Registration::Sent(_)) => outcome = Outcome::Pending,
                // Refused, or forgotten meanwhile (a closed session): the message cannot go as it is.
                Some(Registration::Refused) | None => return Outcome::Refused,
            }
        }
        outcome
    }

    /// Gives up waiting for the peer's answer for `segments`: they are not used with this peer again (the peer is
    /// told to forget any it maps after all), and new registrations pause.
    pub(super) fn give_up(&self, segments: &[u32]) {
        let mut abandoned = Vec::new();
        {
            let mut regs = lock(&self.registrations);
            for id in segments {
                if let Some(r @ Registration::Sent(_)) = regs.get_mut(id) {
                    *r = Registration::Refused;
                    abandoned.push(*id);
                }
            }
        }
        if abandoned.is_empty() {
            return;
        }
        tracing::debug!(segments = abandoned.len(), "the peer did not answer registrations in time");
        self.pause_registrations();
        for segment in abandoned {
            if let Err(e) = self.outbox.send(Kind::Forget(v1::Forget { segment }), None) {
                tracing::debug!(?e, "forget not sent; the session is closing");
            }
        }
    }

    /// Starts (or lengthens) the pause of new registrations after a refusal.
    fn pause_registrations(&self) {
        let mut b = lock(&self.backoff);
        b.until = Some(Instant::now() + b.next);
        b.next = (b.next * 2).min(MAX_BACKOFF);
    }

    /// Whether new registrations are paused now.
    fn registrations_paused(&self) -> bool {
        lock(&self.backoff).until.is_some_and(|t| Instant::now() < t)
    }

    /// Drops the holds of a reference that never reached the peer (it went inline instead): one per `sender` part.
    pub(super) fn cancel_holds(&self, parts: &[v1::Part]) {
        let taken = take_for_parts(&mut lock(&self.holds), parts, |k| match k {
            part::Kind::Sender(r) => Some(r),
            _ => None,
        });
        for (_, n, _, _) in &taken {
            self.held.fetch_sub(*n, Ordering::AcqRel);
        }
        // The buffers may go back to the pool here, outside every session lock.
        drop(taken);
        self.progress.notify_waiters();
    }

    /// Encodes `item` (of `len` encoded bytes) for the peer into the parts of a reference.
    ///
    /// Slices that already lie in shared memory (our loans, the peer's `regions`) are referred to where they are;
    /// everything else is encoded straight into a pool buffer. Any failure is a reason to send inline instead, and
    /// then nothing stays held. Never waits on the peer: a new segment's registration is queued and the reference
    /// may overtake it (the receiver holds the message back until it has the segment).
    ///
    /// `message` is the call's number and the message's index in it, when the session numbers calls: the holds
    /// then carry the message's tag (see `calls.rs`).
    pub(super) fn encode<M: Message>(
        &self,
        item: &M,
        len: usize,
        regions: &dyn PeerRegions,
        message: Option<(u64, u64)>,
    ) -> Result<Encoded, Fallback> {
        if self.outbox.is_closed() {
            return Err(Fallback::SessionClosed);
        }
        let mut pending = Pending::default();
        let parts = if self.has_shared_candidates(regions) {
            let locate = |s: &[u8]| self.locate(s, regions);
            let alloc = |n: usize| self.alloc(n).ok();
            let mut buf = SplitBuf::new(&locate, &alloc, len.min(MAX_INLINE));
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
                        pending.sent_back.push(region);
                        part::Kind::Receiver(r)
                    }
                });
            }
            parts
        } else {
            let mut lease = self.alloc(len)?;
            // Before the copy: a segment the peer cannot have (refused, or registrations paused) costs nothing.
            self.ensure_registered(&lease)?;
            {
                // Large fields are copied by several threads when cores are free (`copy`).
                let mut dst = crate::copy::Writer::new(&mut lease);
                item.encode(&mut dst).expect("the lease holds exactly encoded_len bytes");
            }
            vec![self.refer(Outgoing::new(lease), 0, len, &mut pending)?]
        };
        let parts: Vec<v1::Part> = parts.into_iter().map(|k| v1::Part { kind: Some(k) }).collect();
        let tag = match message {
            Some((call, index)) if !pending.holds.is_empty() || !pending.sent_back.is_empty() => {
                Some(Arc::new(MessageTag { call, index, parts: parts.clone() }))
            }
            _ => None,
        };
        let lost = tag.as_ref().is_some_and(|t| !lock(&self.calls).record(t));
        // Commit: from here the peer may read and must release.
        {
            let mut holds = lock(&self.holds);
            let now = Instant::now();
            for (buf, n) in pending.holds {
                self.held.fetch_add(n, Ordering::AcqRel);
                holds.entry((buf.lease.id(), buf.lease.generation())).or_default().push((buf, n, now, tag.clone()));
            }
        }
        // Every segment not acknowledged yet, refused ones included: an answer may have come while this message was
        // being copied, and a refused segment's message must be taken back, not sent.
        let mut unacknowledged: Vec<u32> = {
            let regs = lock(&self.registrations);
            pending.segments.iter().copied().filter(|id| regs.get(id) != Some(&Registration::Acknowledged)).collect()
        };
        unacknowledged.sort_unstable();
        unacknowledged.dedup();
        Ok(Encoded { parts, sent_back: pending.sent_back, unacknowledged, tag, lost })
    }

    /// A pool buffer for sending, never waiting (the encoder runs on a poll path). When the budget is used up, the
    /// pool's return count is noted, so the next call waits asynchronously for a return before its first message
    /// (see [`Sender::pool_short`]).
    ///
    /// The pool is shared by every session of the channel or server: while there are several, a peer that already
    /// holds a sixteenth of the budget or more gets a buffer only while a quarter of the budget stays free of
    /// leases, so that peers that keep what they are sent cannot push the others' messages inline (they lose their
    /// own shared memory only).
    fn alloc(&self, len: usize) -> Result<Lease, Fallback> {
        let pool = &self.params.pool;
        let budget = pool.config().budget_bytes();
        // Only among several sessions: a channel's own pool serves one peer, which may use all of it.
        let shared = self.params.sessions.load(Ordering::Relaxed) > 1;
        let heavy = shared && self.held() >= budget / HEAVY_SHARE;
        let keep = if heavy { budget / RESERVED_FOR_LIGHT } else { 0 };
        let returned = pool.returned();
        pool.try_alloc_for(self.tenant, len, keep).map_err(|_| {
            self.short_at.store(returned, Ordering::Release);
            if heavy { Fallback::ShareExceeded } else { Fallback::PoolExhausted }
        })
    }

    /// Whether the last allocation failed for lack of budget and no buffer has come back to the pool since, while
    /// the configuration allows a wait for one.
    pub(super) fn pool_short(&self) -> bool {
        !self.params.exhausted_wait.is_zero() && self.short_at.load(Ordering::Acquire) == self.params.pool.returned()
    }

    /// How long a call may wait for a buffer to come back before its messages go inline.
    pub(super) fn exhausted_wait(&self) -> Duration {
        self.params.exhausted_wait
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
        pending.segments.push(region.segment);
        Ok(part::Kind::Sender(region))
    }

    /// Tells the peer to drop its mappings of our buffers that the pool has since dropped (otherwise the peer's
    /// mapping would keep their memory alive). Runs only when the pool's eviction count moved.
    pub(super) fn forget_evicted(&self) {
        let evictions = self.params.pool.evictions();
        if self.seen_evictions.swap(evictions, Ordering::Relaxed) == evictions {
            return;
        }
        let gone: Vec<(u32, Registration)> = {
            let mut regs = lock(&self.registrations);
            let gone: Vec<(u32, Registration)> =
                regs.iter().filter(|(id, _)| !self.params.pool.exists(**id)).map(|(&id, &r)| (id, r)).collect();
            for (id, _) in &gone {
                regs.remove(id);
            }
            gone
        };
        for (segment, reg) in gone {
            if reg != Registration::Refused
                && let Err(e) = self.outbox.send(Kind::Forget(v1::Forget { segment }), None)
            {
                tracing::debug!(?e, "forget not sent; the session is closing");
            }
        }
    }

    /// Makes sure the peer has our segment: the first time, queues its `Register` (with the memfd, or its name)
    /// and returns at once (protocol §5: no round trip).
    fn ensure_registered(&self, lease: &Lease) -> Result<(), Fallback> {
        self.forget_evicted();
        let id = lease.id();
        {
            let mut regs = lock(&self.registrations);
            match regs.get(&id) {
                Some(Registration::Sent(_) | Registration::Acknowledged) => return Ok(()),
                Some(Registration::Refused) => return Err(Fallback::RegistrationFailed),
                None if self.registrations_paused() => return Err(Fallback::RegistrationFailed),
                None => {}
            }
            regs.insert(id, Registration::Sent(Instant::now()));
        }
        let len = lease.segment_len() as u64;
        let register = |source| Kind::Register(v1::Register { segment: id, len, source });
        let sent = match lease.share() {
            Ok(SegmentHandle::Memfd(fd)) => self.outbox.send(register(None), Some(fd)),
            Ok(SegmentHandle::Posix(name)) => {
                self.outbox.send(register(Some(v1::register::Source::PosixName(name.as_str().to_string()))), None)
            }
            Ok(SegmentHandle::SysV(sid)) => {
                self.outbox.send(register(Some(v1::register::Source::SysvId(sid.as_raw()))), None)
            }
            Err(e) => {
                tracing::debug!(error = %e, "segment not shareable; sending inline");
                lock(&self.registrations).insert(id, Registration::Refused);
                return Err(Fallback::RegistrationFailed);
            }
        };
        sent.map_err(|_| {
            lock(&self.registrations).remove(&id);
            Fallback::SessionClosed
        })
    }

    /// The peer's answer to a registration. An error marks the segment as unusable with this peer and pauses new
    /// registrations; messages waiting for the answer then go inline (see `body/outgoing.rs`), later ones use other buffers
    /// or go inline too.
    pub(super) fn on_registered(&self, ack: v1::Registered) {
        if ack.error.is_empty() {
            let mut regs = lock(&self.registrations);
            if let Some(r) = regs.get_mut(&ack.segment)
                && let Registration::Sent(at) = *r
            {
                *r = Registration::Acknowledged;
                drop(regs);
                *lock(&self.backoff) = Backoff::default();
                self.recorder().registration_latency(at.elapsed());
            }
        } else {
            tracing::debug!(error = %ack.error, "the peer refused one of our segments");
            let mut regs = lock(&self.registrations);
            if let Some(r) = regs.get_mut(&ack.segment) {
                *r = Registration::Refused;
            }
            drop(regs);
            self.pause_registrations();
        }
        self.progress.notify_waiters();
    }

    /// The peer no longer reads a `sender` part: one hold goes, and with it its bytes from the window. A release
    /// of something the peer does not hold (stale, repeated, forged) changes nothing and is counted as refused.
    pub(super) fn on_release(&self, segment: u32, generation: u32) {
        let taken = take_one(&mut lock(&self.holds), (segment, generation));
        match taken {
            Some((buf, n, at, _)) => {
                self.recorder().release_latency(at.elapsed());
                self.held.fetch_sub(n, Ordering::AcqRel);
                // The buffer may go back to the pool here, outside every session lock.
                drop(buf);
                self.progress.notify_waiters();
            }
            None => {
                self.recorder().record_both(Event::BadRelease);
                self.recorder().record_both(Event::PeerRefusal);
                tracing::debug!(segment, "refused a release of a buffer the peer does not hold");
            }
        }
    }

    /// Copies the bytes of a `sender` part of ours that the peer holds, for a message that goes inline after all;
    /// `None` if we hold no such buffer or the range is not inside it.
    pub(super) fn copy_held(&self, r: &v1::Region, out: &mut Vec<u8>) -> Option<()> {
        let buf = self.held_buffer(r.segment, r.generation)?;
        let offset = r.offset.checked_sub(buf.lease.offset() as u64)?;
        let (start, end) =
            crate::segment::check_range(crate::segment::Backend::Memfd, offset, r.len, buf.lease.len()).ok()?;
        out.extend_from_slice(&buf.lease[start..end]);
        Some(())
    }

    /// Our buffer held for the peer under `(segment, generation)`, for a `receiver` part the peer sent back.
    pub(super) fn held_buffer(&self, segment: u32, generation: u32) -> Option<Arc<Outgoing>> {
        lock(&self.holds).get(&(segment, generation)).and_then(|v| v.first().map(|(b, _, _, _)| b.clone()))
    }

    /// An outgoing body of call `call` begins: a `CallEnd` from the peer while it lives also covers the messages
    /// it sends afterwards.
    pub(super) fn open_call(&self, call: u64) {
        lock(&self.calls).open(call);
    }

    /// An outgoing body of call `call` is gone.
    pub(super) fn close_call(&self, call: u64) {
        lock(&self.calls).close(call);
    }

    /// The peer read only the first `received` messages of our call `call` (`CallEnd`, protocol §7): the tags of
    /// the messages after them that still have something held, for [`Sender::cancel_tagged`] and the receiving
    /// half. A call we know nothing of changes nothing.
    pub(super) fn on_call_end(&self, call: u64, received: u64) -> Vec<Arc<MessageTag>> {
        let lost = lock(&self.calls).end(call, received);
        if !lost.is_empty() {
            tracing::debug!(call, received, lost = lost.len(), "the peer ended a call before some of its messages");
        }
        lost
    }

    /// Drops the holds of the message `tag` names (it never reached the peer), and only those.
    pub(super) fn cancel_tagged(&self, tag: &Arc<MessageTag>) {
        let taken = take_tagged(
            &mut lock(&self.holds),
            tag,
            |k| match k {
                part::Kind::Sender(r) => Some(r),
                _ => None,
            },
            |h: &Hold| h.3.as_ref(),
        );
        for (_, n, _, _) in &taken {
            self.held.fetch_sub(*n, Ordering::AcqRel);
        }
        // The buffers may go back to the pool here, outside every session lock.
        drop(taken);
        self.progress.notify_waiters();
    }
}

#[cfg(test)]
mod tests;
