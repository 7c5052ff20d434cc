//! Sessions: what a shmgrpc client and server share once they have proven they share memory.
//!
//! A session lives on a side channel of its own (a Unix socket; hyper owns the gRPC socket, so descriptors cannot
//! ride on it). Over it each side registers the segments it will refer to (memfd descriptors, `SCM_RIGHTS`), and
//! receivers send releases back. The side channel is served by one blocking OS thread per session and side: it is
//! independent of any async runtime, so a codec (whose methods are synchronous) can wait for a registration to be
//! acknowledged without ever deadlocking a runtime.
//!
//! Each session has a 16-byte random id, secret to its two peers; references carry it, and a receiver resolves a
//! reference only through the session it names, and only to segments that session's peer registered. When the side
//! channel closes (the peer ended or died), everything lent to the peer returns to the pool and every mapping of the
//! peer's segments is dropped (readers still holding payload bytes keep theirs until they drop them).
//!
//! The exchange is specified in `docs/protocol.md`.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::attach::AttachCache;
use crate::parts::{Piece, SplitBuf};
use crate::pool::{Lease, Pool, PoolConfig};
use crate::proto::v1::{self, part};
use crate::segment::{PeerSegment, PosixName, SegmentHandle, SysVId};
use crate::stats::{self, Fallback};
use crate::wire::{self, Kind, Reference};

/// A frame waiting for the writer thread, with the descriptor it carries.
struct Outbound {
    msg: wire::SideMessage,
    fd: Option<OwnedFd>,
}

/// Frames that may wait for the writer; a peer that lets this many pile up is not reading.
const QUEUE: usize = 65_536;
/// Bytes of small frames gathered into one write.
const COALESCE: usize = 64 * 1024;
/// How long one side-channel write may block the writer thread.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Protocol version spoken on the side channel and in discovery.
pub const PROTOCOL_VERSION: u32 = 1;

/// How long a sender waits for the peer to acknowledge a segment registration.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Most segments one peer may have registered with us at once, and their total size.
const MAX_PEER_SEGMENTS: usize = 4096;
const MAX_PEER_BYTES: u64 = 256 << 30;

/// Which end of the session this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Role {
    Client,
    Server,
}

/// A session id: 16 random bytes.
pub(crate) type SessionId = [u8; 16];

/// Live sessions of this process by id and role (a process can hold both ends, for example in tests).
type Registry = HashMap<(SessionId, Role), Weak<Session>>;
static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a side sends (shared by the client and server configurations).
#[derive(Debug, Clone)]
pub(crate) struct SendConfig {
    pub(crate) pool: Option<Pool>,
    pub(crate) pool_config: PoolConfig,
    pub(crate) threshold: usize,
    pub(crate) exhausted_wait: Duration,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            pool: None,
            pool_config: PoolConfig::default(),
            threshold: DEFAULT_THRESHOLD,
            exhausted_wait: Duration::ZERO,
        }
    }
}

impl SendConfig {
    /// The session parameters: the given pool, or a new one of `pool_config`.
    pub(crate) fn into_params(self) -> crate::Result<SessionParams> {
        let pool = match self.pool {
            Some(p) => p,
            None => Pool::new(self.pool_config)?,
        };
        Ok(SessionParams { pool, threshold: self.threshold, exhausted_wait: self.exhausted_wait })
    }
}

/// Default size from which a message goes through shared memory.
pub const DEFAULT_THRESHOLD: usize = 64 * 1024;

/// Parameters a session is created with.
#[derive(Clone, Debug)]
pub(crate) struct SessionParams {
    pub(crate) pool: Pool,
    pub(crate) threshold: usize,
    /// How long the encoder may block for a pool buffer before sending inline.
    pub(crate) exhausted_wait: Duration,
}

/// Most parts a reference may have, and most bytes its inline parts may carry.
const MAX_PARTS: usize = 64;
const MAX_INLINE: usize = 32 * 1024;

/// One of our pool buffers while it serves for sending. It lives as long as any `Bytes` over it (a loan, or a
/// received echo of it) or any hold for the peer; then the lease returns to the pool.
pub(crate) struct Outgoing {
    lease: Lease,
}

impl Outgoing {
    fn contains(&self, s: &[u8]) -> Option<usize> {
        let base = self.lease.as_ptr() as usize;
        let p = s.as_ptr() as usize;
        (p >= base && p + s.len() <= base + self.lease.len()).then(|| p - base)
    }
}

/// `Bytes` owner over an [`Outgoing`].
struct OutgoingView(Arc<Outgoing>);

impl AsRef<[u8]> for OutgoingView {
    fn as_ref(&self) -> &[u8] {
        &self.0.lease
    }
}

/// A region of the peer's memory this process reads: one per `sender` part received. Dropping it sends the
/// release for that part.
pub(crate) struct Incoming {
    seg: Arc<PeerSegment>,
    segment: u32,
    generation: u32,
    start: usize,
    end: usize,
    session: Weak<Session>,
}

impl Incoming {
    fn contains(&self, s: &[u8]) -> Option<u64> {
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
    fn drop(&mut self) {
        if let Some(s) = self.session.upgrade() {
            s.send_release(self.segment, self.generation);
        }
    }
}

/// `Bytes` owner over an [`Incoming`] (the `Arc` lets the encoder find and keep it for an echo).
struct IncomingView(Arc<Incoming>);

impl AsRef<[u8]> for IncomingView {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref().as_ref()
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
                    s.note_loan(&buf);
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

/// Holds and returns taken while building one reference, committed only if the whole reference is built.
#[derive(Default)]
struct Pending {
    holds: Vec<Arc<Outgoing>>,
    returning: Vec<Arc<Incoming>>,
}

/// Figures of one session (or the sum over a server's sessions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Live sessions counted.
    pub sessions: usize,
    /// The peer's segments mapped here.
    pub peer_segments: usize,
    /// Their bytes.
    pub peer_bytes: u64,
    /// Our segments the peer has mapped.
    pub shared_segments: usize,
    /// Holds the peer has on our buffers (one per `sender` part not yet released).
    pub holds: usize,
    /// Regions of the peer's we sent back and keep until it answers `Returned`.
    pub returning: usize,
}

impl std::ops::Add for SessionStats {
    type Output = SessionStats;
    fn add(self, o: SessionStats) -> SessionStats {
        SessionStats {
            sessions: self.sessions + o.sessions,
            peer_segments: self.peer_segments + o.peer_segments,
            peer_bytes: self.peer_bytes + o.peer_bytes,
            shared_segments: self.shared_segments + o.shared_segments,
            holds: self.holds + o.holds,
            returning: self.returning + o.returning,
        }
    }
}

/// A resolved reference: the message's parts, and the peer segments they lie in (to check afterwards that none
/// was shrunk under the reader).
pub(crate) struct Resolved {
    pub(crate) parts: Vec<Bytes>,
    pub(crate) segments: Vec<Arc<PeerSegment>>,
}

/// Entries by (segment, generation).
type ByRegion<T> = HashMap<(u32, u32), Vec<T>>;

/// One end of an established session.
pub(crate) struct Session {
    id: SessionId,
    role: Role,
    params: SessionParams,
    peer_pid: u32,
    /// Frames for the writer thread; `None` once the session is closed.
    queue: Mutex<Option<Sender<Outbound>>>,
    /// Frames queued and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    /// A handle on the side channel, to shut it down when the session closes.
    socket: UnixStream,
    /// Our segments the peer has mapped.
    shared: Mutex<HashSet<u32>>,
    /// Registrations waiting for the peer's answer.
    acks: Mutex<HashMap<u32, SyncSender<Result<(), String>>>>,
    /// The peer's segments we have mapped.
    peer: AttachCache<u32>,
    /// Our buffers the peer may read: one entry per `sender` part sent and not yet released.
    holds: Mutex<ByRegion<Arc<Outgoing>>>,
    /// Live loans made for this session: slices of them are sent without a copy.
    loans: Mutex<Vec<Weak<Outgoing>>>,
    /// Live regions of the peer's memory: slices of them are sent back without a copy.
    regions: Mutex<Vec<Weak<Incoming>>>,
    /// Regions we sent back to the peer, kept until it answers `Returned`.
    returning: Mutex<ByRegion<Arc<Incoming>>>,
    alive: AtomicBool,
    header: http::HeaderValue,
    /// The pool's eviction count when we last looked for dropped buffers the peer still maps.
    seen_evictions: AtomicU64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("role", &self.role).field("peer_pid", &self.peer_pid).finish_non_exhaustive()
    }
}

impl Session {
    /// Creates the session, registers it, and starts its side-channel reader thread.
    pub(crate) fn start(
        id: SessionId,
        role: Role,
        params: SessionParams,
        stream: UnixStream,
        peer_pid: u32,
    ) -> std::io::Result<Arc<Session>> {
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let reader = stream.try_clone()?;
        let writer = stream.try_clone()?;
        // Unbounded channel (allocates as it goes), bounded by the `queued` count instead.
        let (tx, rx) = channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer_queued = queued.clone();
        let params_evictions = params.pool.evictions();
        let session = Arc::new(Session {
            id,
            role,
            params,
            peer_pid,
            queue: Mutex::new(Some(tx)),
            queued,
            socket: stream,
            shared: Mutex::default(),
            acks: Mutex::default(),
            peer: AttachCache::new(),
            holds: Mutex::default(),
            loans: Mutex::default(),
            regions: Mutex::default(),
            returning: Mutex::default(),
            alive: AtomicBool::new(true),
            header: http::HeaderValue::from_str(&id.iter().map(|b| format!("{b:02x}")).collect::<String>())
                .expect("hex is a valid header value"),
            seen_evictions: AtomicU64::new(params_evictions),
        });
        lock(&REGISTRY).insert((id, role), Arc::downgrade(&session));
        // The reader holds the session weakly: the session ends when its owner (the channel, the server) lets go,
        // not when the thread gets round to noticing.
        let weak = Arc::downgrade(&session);
        let weak_writer = weak.clone();
        std::thread::Builder::new()
            .name("shmgrpc-side".into())
            .spawn(move || Session::read_loop(weak, reader))
            .inspect_err(|_| session.close())?;
        std::thread::Builder::new()
            .name("shmgrpc-side-w".into())
            .spawn(move || Session::write_loop(weak_writer, writer, rx, writer_queued))
            .inspect_err(|_| session.close())?;
        tracing::debug!(?role, peer_pid, "shmgrpc session established");
        Ok(session)
    }

    pub(crate) fn id(&self) -> SessionId {
        self.id
    }

    /// The `shmgrpc-session` header value: the id in lowercase hex (made once per session, sent with every call).
    pub(crate) fn header(&self) -> &http::HeaderValue {
        &self.header
    }

    /// Finds a live session of this process by id and role.
    pub(crate) fn lookup(id: &[u8], role: Role) -> Option<Arc<Session>> {
        let id: SessionId = id.try_into().ok()?;
        lock(&REGISTRY).get(&(id, role)).and_then(Weak::upgrade).filter(|s| s.is_alive())
    }

    /// Finds a live session from the hex id of the `shmgrpc-session` header.
    pub(crate) fn lookup_hex(hex: &str, role: Role) -> Option<Arc<Session>> {
        if hex.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Session::lookup(&id, role)
    }

    pub(crate) fn stats(&self) -> SessionStats {
        if !self.is_alive() {
            return SessionStats::default();
        }
        let peer = self.peer.stats();
        SessionStats {
            sessions: 1,
            peer_segments: peer.segments,
            peer_bytes: peer.bytes,
            shared_segments: lock(&self.shared).len(),
            holds: lock(&self.holds).values().map(Vec::len).sum(),
            returning: lock(&self.returning).values().map(Vec::len).sum(),
        }
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    pub(crate) fn threshold(&self) -> usize {
        self.params.threshold
    }

    /// Whether `data` lies inside one of the peer's segments we have mapped or one of our pool's buffers.
    pub(crate) fn maps(&self, data: &[u8]) -> bool {
        self.peer.contains(data) || self.params.pool.contains(data)
    }

    /// Queues a frame for the peer (never blocks). A peer that lets the queue fill up is not reading its side
    /// channel: the session is closed rather than let it stall whoever sends.
    pub(crate) fn send(&self, kind: Kind, fd: Option<OwnedFd>) -> std::io::Result<()> {
        let closed = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "session closed");
        {
            let queue = lock(&self.queue);
            let tx = queue.as_ref().ok_or_else(closed)?;
            // Counted before it is sent, so the writer's decrement can never run ahead of it.
            if self.queued.fetch_add(1, Ordering::AcqRel) < QUEUE {
                return tx.send(Outbound { msg: wire::frame(kind), fd }).map_err(|_| {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    closed()
                });
            }
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        tracing::warn!(role = ?self.role, "the peer does not read its side channel; closing the session");
        self.close();
        Err(closed())
    }

    /// The writer thread: sends queued frames, several in one write when they pile up. Ends when the session
    /// closes or a write fails (then it closes the session).
    fn write_loop(weak: Weak<Session>, sock: UnixStream, rx: Receiver<Outbound>, queued: Arc<AtomicUsize>) {
        let mut buf = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            let mut result = Ok(());
            while let Some(out) = next.take() {
                queued.fetch_sub(1, Ordering::AcqRel);
                result = match out.fd {
                    // A descriptor rides with the first byte of its frame: flush what is pending, then send it.
                    Some(fd) => {
                        wire::flush(&sock, &mut buf).and_then(|()| wire::write_frame(&sock, &out.msg, Some(fd.as_fd())))
                    }
                    None => {
                        wire::encode_frame(&out.msg, &mut buf);
                        Ok(())
                    }
                };
                if result.is_err() {
                    break;
                }
                if buf.len() < COALESCE {
                    next = rx.try_recv().ok();
                }
            }
            if result.is_ok() {
                result = wire::flush(&sock, &mut buf);
            }
            if let Err(e) = result {
                if let Some(s) = weak.upgrade() {
                    tracing::debug!(error = %e, "side-channel write failed; closing the session");
                    s.close();
                }
                return;
            }
        }
    }

    /// A loan of `len` bytes from this session's pool; ordinary memory when the session is closed or the pool is
    /// out of budget.
    pub(crate) fn loan(self: &Arc<Self>, len: usize) -> Loan {
        if !self.is_alive() {
            return Loan::heap(len);
        }
        match self.params.pool.try_alloc(len) {
            Ok(lease) => {
                Loan { inner: LoanInner::Shared { buf: Arc::new(Outgoing { lease }), session: Arc::downgrade(self) } }
            }
            Err(e) => {
                tracing::debug!(error = %e, "loan from ordinary memory");
                stats::fallback(Fallback::PoolExhausted);
                Loan::heap(len)
            }
        }
    }

    fn note_loan(&self, buf: &Arc<Outgoing>) {
        let mut loans = lock(&self.loans);
        loans.retain(|w| w.strong_count() > 0);
        loans.push(Arc::downgrade(buf));
    }

    /// Finds `s` in one of our live loans or one of the peer's live regions.
    pub(crate) fn locate(&self, s: &[u8]) -> Option<Located> {
        for buf in lock(&self.loans).iter().filter_map(Weak::upgrade) {
            if let Some(offset) = buf.contains(s) {
                return Some(Located::Ours { buf, offset, len: s.len() });
            }
        }
        for region in lock(&self.regions).iter().filter_map(Weak::upgrade) {
            if let Some(offset) = region.contains(s) {
                return Some(Located::Theirs { region, offset, len: s.len() as u64 });
            }
        }
        None
    }

    /// Whether anything the encoder could refer to without a copy is alive.
    fn has_shared_candidates(&self) -> bool {
        let mut loans = lock(&self.loans);
        loans.retain(|w| w.strong_count() > 0);
        let mut regions = lock(&self.regions);
        regions.retain(|w| w.strong_count() > 0);
        !loans.is_empty() || !regions.is_empty()
    }

    /// Encodes `item` (of `len` encoded bytes) for the peer and returns the reference to send in its place.
    ///
    /// Slices that already lie in shared memory (our loans, the peer's regions) are referred to where they are;
    /// everything else is encoded straight into a pool buffer. Any failure is a reason to send inline instead, and
    /// then nothing stays held.
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
                        self.lend(Arc::new(Outgoing { lease }), 0, v.len(), &mut pending)?
                    }
                    Piece::Owned(lease) => {
                        let n = lease.len();
                        self.lend(Arc::new(Outgoing { lease }), 0, n, &mut pending)?
                    }
                    Piece::Shared(Located::Ours { buf, offset, len }) => self.lend(buf, offset, len, &mut pending)?,
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
            vec![self.lend(Arc::new(Outgoing { lease }), 0, len, &mut pending)?]
        };
        // Commit: from here the peer may read and must release.
        {
            let mut holds = lock(&self.holds);
            for buf in pending.holds {
                holds.entry((buf.lease.id(), buf.lease.generation())).or_default().push(buf);
            }
        }
        {
            let mut returning = lock(&self.returning);
            for region in pending.returning {
                returning.entry((region.segment, region.generation)).or_default().push(region);
            }
        }
        Ok(Reference {
            session: Bytes::copy_from_slice(&self.id),
            from_server: self.role == Role::Server,
            parts: parts.into_iter().map(|k| v1::Part { kind: Some(k) }).collect(),
        })
    }

    /// A pool buffer for sending, waiting up to the configured time when the budget is used up.
    pub(crate) fn alloc(&self, len: usize) -> Result<Lease, Fallback> {
        let r = if self.params.exhausted_wait.is_zero() {
            self.params.pool.try_alloc(len)
        } else {
            self.params.pool.alloc_blocking(len, self.params.exhausted_wait)
        };
        r.map_err(|_| Fallback::PoolExhausted)
    }

    /// A `sender` part for `len` bytes at `offset` of `buf`, registering the segment first if the peer lacks it.
    fn lend(
        &self,
        buf: Arc<Outgoing>,
        offset: usize,
        len: usize,
        pending: &mut Pending,
    ) -> Result<part::Kind, Fallback> {
        let lease = &buf.lease;
        self.ensure_registered(lease.id(), || lease.share(), lease.capacity())?;
        let region =
            v1::Region { segment: lease.id(), generation: lease.generation(), offset: offset as u64, len: len as u64 };
        pending.holds.push(buf);
        Ok(part::Kind::Sender(region))
    }

    /// Tells the peer to drop its mappings of our buffers that the pool has since dropped (otherwise the peer's
    /// mapping would keep their memory alive). Runs only when the pool's eviction count moved.
    fn forget_evicted(&self) {
        let evictions = self.params.pool.evictions();
        if self.seen_evictions.swap(evictions, Ordering::Relaxed) == evictions {
            return;
        }
        let gone: Vec<u32> = {
            let mut shared = lock(&self.shared);
            let gone: Vec<u32> = shared.iter().copied().filter(|&id| !self.params.pool.exists(id)).collect();
            for id in &gone {
                shared.remove(id);
            }
            gone
        };
        for segment in gone {
            if let Err(e) = self.send(Kind::Forget(v1::Forget { segment }), None) {
                tracing::debug!(error = %e, "forget not sent; the session is closing");
            }
        }
    }

    /// Makes sure the peer has mapped our segment `id` (registering it and waiting for the answer the first time).
    fn ensure_registered(
        &self,
        id: u32,
        share: impl FnOnce() -> crate::Result<SegmentHandle>,
        len: usize,
    ) -> Result<(), Fallback> {
        self.forget_evicted();
        if lock(&self.shared).contains(&id) {
            return Ok(());
        }
        let handle = share().map_err(|_| Fallback::RegistrationFailed)?;
        let (tx, rx) = sync_channel(1);
        lock(&self.acks).insert(id, tx);
        let register = |source| Kind::Register(v1::Register { segment: id, len: len as u64, source });
        let sent = match handle {
            SegmentHandle::Memfd(fd) => self.send(register(None), Some(fd)),
            SegmentHandle::Posix(name) => {
                self.send(register(Some(v1::register::Source::PosixName(name.as_str().to_string()))), None)
            }
            SegmentHandle::SysV(sid) => self.send(register(Some(v1::register::Source::SysvId(sid.as_raw()))), None),
        };
        let answer = match sent {
            Ok(()) => rx.recv_timeout(REGISTER_TIMEOUT).map_err(|_| "no answer".to_string()).and_then(|r| r),
            Err(e) => Err(e.to_string()),
        };
        lock(&self.acks).remove(&id);
        match answer {
            Ok(()) => {
                lock(&self.shared).insert(id);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer did not map a segment; sending inline");
                Err(Fallback::RegistrationFailed)
            }
        }
    }

    /// Resolves a reference the peer sent into the parts of the message, zero-copy: `sender` parts over the peer's
    /// segments (released when their last `Bytes` is dropped), `receiver` parts over our own buffers.
    pub(crate) fn resolve(self: &Arc<Self>, r: Reference) -> Result<Resolved, tonic::Status> {
        use tonic::Status;
        if r.parts.is_empty() || r.parts.len() > MAX_PARTS {
            return Err(Status::invalid_argument("shmgrpc reference with no parts or too many"));
        }
        let mut out = Vec::with_capacity(r.parts.len());
        let mut segments = Vec::new();
        let mut returned = Vec::new();
        for p in r.parts {
            out.push(match p.kind {
                None => return Err(Status::invalid_argument("shmgrpc reference part without a kind")),
                Some(part::Kind::Inline(b)) => b,
                Some(part::Kind::Sender(reg)) => {
                    let seg = self.peer.get(&reg.segment).ok_or_else(|| {
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
                        let mut regions = lock(&self.regions);
                        regions.retain(|w| w.strong_count() > 0);
                        regions.push(Arc::downgrade(&incoming));
                    }
                    Bytes::from_owner(IncomingView(incoming))
                }
                Some(part::Kind::Receiver(reg)) => {
                    let buf = lock(&self.holds)
                        .get(&(reg.segment, reg.generation))
                        .and_then(|v| v.first().cloned())
                        .ok_or_else(|| {
                            Status::invalid_argument(
                                "shmgrpc reference to a buffer of ours that the peer does not hold",
                            )
                        })?;
                    let (start, end) = crate::segment::check_range(
                        crate::segment::Backend::Memfd,
                        reg.offset,
                        reg.len,
                        buf.lease.len(),
                    )
                    .map_err(|e| Status::out_of_range(format!("shmgrpc reference out of range: {e}")))?;
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
    fn send_release(&self, segment: u32, generation: u32) {
        if !self.is_alive() {
            return;
        }
        if let Err(e) = self.send(Kind::Release(v1::Release { segment, generation }), None) {
            tracing::debug!(error = %e, "release not sent; the session is closing");
        }
    }

    /// Drops one entry of `map` under `key`; false if there was none (a stale, repeated or forged message).
    fn drop_one<T>(map: &Mutex<ByRegion<T>>, key: (u32, u32)) -> bool {
        let taken = {
            let mut m = lock(map);
            match m.get_mut(&key) {
                Some(v) => {
                    let t = v.pop();
                    if v.is_empty() {
                        m.remove(&key);
                    }
                    t
                }
                None => None,
            }
        };
        // Dropped outside the lock: dropping an `Incoming` sends a frame.
        taken.is_some()
    }

    /// The side-channel reader: registrations, their answers, releases, returns. Ends with the connection or
    /// with the session.
    fn read_loop(weak: Weak<Session>, sock: UnixStream) {
        let why = loop {
            let (msg, mut fds) = match wire::read_frame(&sock) {
                Ok(Some(m)) => m,
                Ok(None) => break "peer closed the side channel".to_string(),
                Err(e) => break format!("side channel: {e}"),
            };
            let Some(this) = weak.upgrade() else { break "session dropped".to_string() };
            match msg.kind.expect("read_frame checks") {
                Kind::Register(reg) => {
                    let handle = match (fds.pop(), fds.is_empty(), reg.source) {
                        (Some(fd), true, None) => Ok(SegmentHandle::Memfd(fd)),
                        (None, _, Some(v1::register::Source::PosixName(name))) => PosixName::parse(&name)
                            .map(SegmentHandle::Posix)
                            .map_err(|_| "not a shmgrpc segment name".to_string()),
                        (None, _, Some(v1::register::Source::SysvId(id))) => {
                            Ok(SegmentHandle::SysV(SysVId::from_raw(id)))
                        }
                        _ => {
                            Err("a registration carries one descriptor, or a name or id, and nothing else".to_string())
                        }
                    };
                    let result = handle.and_then(|h| this.accept_segment(reg.segment, reg.len, h));
                    let error = result.err().unwrap_or_default();
                    if !error.is_empty() {
                        tracing::warn!(%error, "refused a segment from the peer");
                    }
                    if let Err(e) = this.send(Kind::Registered(v1::Registered { segment: reg.segment, error }), None) {
                        break format!("side channel: {e}");
                    }
                }
                Kind::Registered(ack) => {
                    let answer = if ack.error.is_empty() { Ok(()) } else { Err(ack.error) };
                    if let Some(tx) = lock(&this.acks).remove(&ack.segment) {
                        let _ = tx.try_send(answer);
                    }
                }
                Kind::Release(rel) => {
                    if !Session::drop_one(&this.holds, (rel.segment, rel.generation)) {
                        stats::bad_release();
                        tracing::warn!(segment = rel.segment, "refused a release of a buffer the peer does not hold");
                    }
                }
                Kind::Returned(ret) => {
                    if !Session::drop_one(&this.returning, (ret.segment, ret.generation)) {
                        stats::bad_release();
                        tracing::warn!(segment = ret.segment, "refused a return of a region we did not send back");
                    }
                }
                Kind::Forget(f) => {
                    this.peer.detach(&f.segment);
                }
                Kind::Refused(r) => break format!("peer refused: {}", r.reason),
                _ => break "unexpected frame on an established side channel".to_string(),
            }
        };
        if let Some(this) = weak.upgrade() {
            tracing::debug!(role = ?this.role, reason = %why, "shmgrpc session closed");
            this.close();
        }
    }

    /// Maps a segment the peer registered, within the per-session limits. A named segment (POSIX, System V) must
    /// have been created by the peer process itself: a name or id alone proves nothing.
    fn accept_segment(&self, segment: u32, len: u64, handle: SegmentHandle) -> Result<(), String> {
        let st = self.peer.stats();
        if st.segments >= MAX_PEER_SEGMENTS || st.bytes.saturating_add(len) > MAX_PEER_BYTES {
            return Err("too many segments registered".into());
        }
        let seg = PeerSegment::open_created_by(handle, len, self.peer_pid).map_err(|e| e.to_string())?;
        self.peer.insert(segment, seg);
        Ok(())
    }

    /// Ends the session: what the peer held comes back, the peer's mappings go (readers keep theirs until they
    /// drop them).
    pub(crate) fn close(&self) {
        if !self.alive.swap(false, Ordering::AcqRel) {
            return;
        }
        {
            let mut reg = lock(&REGISTRY);
            if reg.get(&(self.id, self.role)).is_some_and(|w| w.upgrade().is_none_or(|s| std::ptr::eq(&*s, self))) {
                reg.remove(&(self.id, self.role));
            }
        }
        lock(&self.queue).take();
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        lock(&self.acks).clear();
        let holds = std::mem::take(&mut *lock(&self.holds));
        let returning = std::mem::take(&mut *lock(&self.returning));
        let back: usize = holds.values().map(Vec::len).sum();
        drop((holds, returning));
        lock(&self.loans).clear();
        lock(&self.regions).clear();
        self.peer.clear();
        tracing::debug!(role = ?self.role, reclaimed = back, "shmgrpc session torn down");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

/// Whether `data` lies in shared memory of a live shmgrpc session: a peer's segment or one of our pool buffers (a
/// payload received through shmgrpc, or echoed back to us without a copy).
pub fn is_shared(data: &[u8]) -> bool {
    let sessions: Vec<Arc<Session>> = lock(&REGISTRY).values().filter_map(Weak::upgrade).collect();
    sessions.iter().any(|s| s.maps(data))
}
