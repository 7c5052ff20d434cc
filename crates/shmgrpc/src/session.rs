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
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::attach::AttachCache;
use crate::pool::Pool;
use crate::proto::v1;
use crate::segment::{PeerSegment, SegmentHandle};
use crate::stats::{self, Fallback};
use crate::wire::{self, Kind, Reference};

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

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Parameters a session is created with.
#[derive(Clone)]
pub(crate) struct SessionParams {
    pub(crate) pool: Pool,
    pub(crate) threshold: usize,
}

/// One end of an established session.
pub(crate) struct Session {
    id: SessionId,
    role: Role,
    /// The tag under which our buffers are lent to this peer in the pool.
    owner: u64,
    params: SessionParams,
    peer_pid: u32,
    writer: Mutex<UnixStream>,
    /// Our segments the peer has mapped.
    shared: Mutex<HashSet<u32>>,
    /// Registrations waiting for the peer's answer.
    acks: Mutex<HashMap<u32, SyncSender<Result<(), String>>>>,
    /// The peer's segments we have mapped.
    peer: AttachCache<u32>,
    alive: AtomicBool,
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
        let reader = stream.try_clone()?;
        let session = Arc::new(Session {
            id,
            role,
            owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
            params,
            peer_pid,
            writer: Mutex::new(stream),
            shared: Mutex::default(),
            acks: Mutex::default(),
            peer: AttachCache::new(),
            alive: AtomicBool::new(true),
        });
        lock(&REGISTRY).insert((id, role), Arc::downgrade(&session));
        let s = session.clone();
        std::thread::Builder::new()
            .name("shmgrpc-side".into())
            .spawn(move || s.read_loop(reader))
            .inspect_err(|_| session.close())?;
        tracing::debug!(?role, peer_pid, "shmgrpc session established");
        Ok(session)
    }

    /// The session id, as the `shmgrpc-session` header carries it.
    pub(crate) fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn id(&self) -> SessionId {
        self.id
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

    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    pub(crate) fn threshold(&self) -> usize {
        self.params.threshold
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.params.pool
    }

    /// Whether `data` lies inside one of the peer's segments we have mapped.
    pub(crate) fn maps(&self, data: &[u8]) -> bool {
        self.peer.contains(data)
    }

    fn send(&self, kind: Kind, fd: Option<std::os::fd::BorrowedFd<'_>>) -> std::io::Result<()> {
        let w = lock(&self.writer);
        wire::write_frame(&w, &wire::frame(kind), fd)
    }

    /// Encodes `item` (of `len` encoded bytes) into a pool buffer lent to the peer, and returns the reference to
    /// send in its place. Any failure is a reason to send inline instead; nothing is lent then.
    pub(crate) fn encode_to_shm<M: Message>(&self, item: &M, len: usize) -> Result<Reference, Fallback> {
        if !self.is_alive() {
            return Err(Fallback::SessionClosed);
        }
        let mut lease = self.params.pool.try_alloc(len).map_err(|_| Fallback::PoolExhausted)?;
        {
            let mut dst: &mut [u8] = &mut lease;
            item.encode(&mut dst).expect("the lease holds exactly encoded_len bytes");
        }
        self.ensure_registered(lease.id(), || lease.share(), lease.capacity())?;
        let loan = lease.lend(self.owner);
        Ok(Reference {
            session: Bytes::copy_from_slice(&self.id),
            segment: loan.id,
            generation: loan.generation,
            offset: 0,
            len: len as u64,
            from_server: self.role == Role::Server,
        })
    }

    /// Makes sure the peer has mapped our segment `id` (registering it and waiting for the answer the first time).
    fn ensure_registered(
        &self,
        id: u32,
        share: impl FnOnce() -> crate::Result<SegmentHandle>,
        len: usize,
    ) -> Result<(), Fallback> {
        if lock(&self.shared).contains(&id) {
            return Ok(());
        }
        let Ok(SegmentHandle::Memfd(fd)) = share() else {
            // Only memfd segments travel over the side channel for now.
            return Err(Fallback::RegistrationFailed);
        };
        let (tx, rx) = sync_channel(1);
        lock(&self.acks).insert(id, tx);
        let sent = self.send(Kind::Register(v1::Register { segment: id, len: len as u64 }), Some(fd.as_fd()));
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

    /// Resolves a reference the peer sent into the bytes it names, zero-copy. Dropping the last `Bytes` over them
    /// sends the release.
    pub(crate) fn resolve(self: &Arc<Self>, r: &Reference) -> Result<Bytes, tonic::Status> {
        let seg = self.peer.get(&r.segment).ok_or_else(|| {
            tonic::Status::invalid_argument("shmgrpc reference to a segment the peer never registered")
        })?;
        let (offset, len) = (r.offset, r.len);
        let (start, end) = crate::segment::check_range(seg.backend(), offset, len, seg.len())
            .map_err(|e| tonic::Status::out_of_range(format!("shmgrpc reference out of range: {e}")))?;
        let region = Region {
            seg,
            start,
            end,
            release: Release { session: Arc::downgrade(self), segment: r.segment, generation: r.generation },
        };
        Ok(Bytes::from_owner(region))
    }

    /// Sends a release for a buffer of the peer's (best effort: a closed session needs none).
    fn release(&self, segment: u32, generation: u32) {
        if !self.is_alive() {
            return;
        }
        if let Err(e) = self.send(Kind::Release(v1::Release { segment, generation }), None) {
            tracing::debug!(error = %e, "release not sent; the session is closing");
        }
    }

    /// The side-channel reader: registrations, their answers, releases. Ends with the connection.
    fn read_loop(self: Arc<Self>, sock: UnixStream) {
        let why = loop {
            let (msg, mut fds) = match wire::read_frame(&sock) {
                Ok(Some(m)) => m,
                Ok(None) => break "peer closed the side channel".to_string(),
                Err(e) => break format!("side channel: {e}"),
            };
            match msg.kind.expect("read_frame checks") {
                Kind::Register(reg) => {
                    let result = match (fds.pop(), fds.is_empty()) {
                        (Some(fd), true) => self.accept_segment(reg.segment, reg.len, fd),
                        _ => Err("a registration must carry exactly one descriptor".to_string()),
                    };
                    let error = result.err().unwrap_or_default();
                    if !error.is_empty() {
                        tracing::warn!(%error, "refused a segment from the peer");
                    }
                    if let Err(e) = self.send(Kind::Registered(v1::Registered { segment: reg.segment, error }), None) {
                        break format!("side channel: {e}");
                    }
                }
                Kind::Registered(ack) => {
                    let answer = if ack.error.is_empty() { Ok(()) } else { Err(ack.error) };
                    if let Some(tx) = lock(&self.acks).remove(&ack.segment) {
                        let _ = tx.try_send(answer);
                    }
                }
                Kind::Release(rel) => {
                    if let Err(e) = self.params.pool.reclaim(self.owner, rel.segment, rel.generation) {
                        stats::bad_release();
                        tracing::warn!(error = %e, "refused a release from the peer");
                    }
                }
                Kind::Forget(f) => {
                    self.peer.detach(&f.segment);
                }
                Kind::Refused(r) => break format!("peer refused: {}", r.reason),
                _ => break "unexpected frame on an established side channel".to_string(),
            }
        };
        tracing::debug!(role = ?self.role, reason = %why, "shmgrpc session closed");
        self.close();
    }

    /// Maps a segment the peer registered, within the per-session limits.
    fn accept_segment(&self, segment: u32, len: u64, fd: std::os::fd::OwnedFd) -> Result<(), String> {
        let st = self.peer.stats();
        if st.segments >= MAX_PEER_SEGMENTS || st.bytes.saturating_add(len) > MAX_PEER_BYTES {
            return Err("too many segments registered".into());
        }
        let seg = PeerSegment::open(SegmentHandle::Memfd(fd), len).map_err(|e| e.to_string())?;
        self.peer.insert(segment, seg);
        Ok(())
    }

    /// Ends the session: buffers lent to the peer come back, the peer's mappings go.
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
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        lock(&self.acks).clear();
        let back = self.params.pool.reclaim_owner(self.owner);
        self.peer.clear();
        tracing::debug!(role = ?self.role, reclaimed = back, "shmgrpc session torn down");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

/// Sends the release when dropped.
struct Release {
    session: Weak<Session>,
    segment: u32,
    generation: u32,
}

impl Drop for Release {
    fn drop(&mut self) {
        if let Some(s) = self.session.upgrade() {
            s.release(self.segment, self.generation);
        }
    }
}

/// The owner behind a received `Bytes`: keeps the mapping alive and releases the buffer when dropped.
struct Region {
    seg: Arc<PeerSegment>,
    start: usize,
    end: usize,
    release: Release,
}

impl AsRef<[u8]> for Region {
    fn as_ref(&self) -> &[u8] {
        let _ = &self.release;
        &self.seg.as_slice()[self.start..self.end]
    }
}

/// Whether `data` lies in shared memory a peer lent to this process (a payload received through shmgrpc).
pub fn is_shared(data: &[u8]) -> bool {
    let sessions: Vec<Arc<Session>> = lock(&REGISTRY).values().filter_map(Weak::upgrade).collect();
    sessions.iter().any(|s| s.maps(data))
}
