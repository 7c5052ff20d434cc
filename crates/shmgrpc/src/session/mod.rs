//! Sessions: what a shmgrpc client and server share once they have proven they share memory.
//!
//! A session lives on a side channel of its own (a Unix socket; hyper owns the gRPC socket, so descriptors cannot
//! ride on it). Over it each side registers the segments it refers to (memfd descriptors, `SCM_RIGHTS`), and
//! receivers send releases back. Its I/O runs as two tasks on the process's I/O runtime ([`crate::io`]), never on
//! a caller's thread: sending a frame only queues it, so no codec, poll or `Drop` ever waits on the peer.
//!
//! Each session has a 16-byte random id, secret to its two peers; references carry it, and a receiver resolves a
//! reference only through the session it names, and only to segments that session's peer registered. When the side
//! channel closes (the peer ended or died), every buffer the peer holds returns to the pool and every mapping of the
//! peer's segments is dropped (readers still holding payload bytes keep theirs until they drop them).
//!
//! - [`side_channel`]: framing and descriptors on the I/O runtime.
//! - [`sender`]: our buffers the peer refers to: encoding into the pool, registration, holds, the in-flight window.
//! - [`receiver`]: the peer's segments: registrations, resolving references, releases and returns.
//! - [`loan`]: the owners behind zero-copy `Bytes` ([`Loan`], `Outgoing`, `Incoming`).
//!
//! The exchange is specified in `docs/protocol.md`.

mod loan;
mod receiver;
mod sender;
pub(crate) mod side_channel;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

pub use loan::Loan;
pub(crate) use receiver::Resolved;

use crate::pool::{Pool, PoolConfig};
use crate::protocol::{
    COALESCE, DEFAULT_THRESHOLD, DEFAULT_WINDOW, DEFAULT_WINDOW_WAIT, MAX_QUEUED_FRAMES, MAX_SESSION_PEER_BYTES,
};
use crate::stats::{Event, Recorder, Side};
use crate::wire::{self, Kind};
use side_channel::FrameReader;

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

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a side sends (shared by the client and server configurations).
#[derive(Debug, Clone)]
pub(crate) struct SendConfig {
    pub(crate) pool: Option<Pool>,
    pub(crate) pool_config: PoolConfig,
    pub(crate) threshold: usize,
    pub(crate) exhausted_wait: Duration,
    pub(crate) window: u64,
    pub(crate) window_wait: Duration,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            pool: None,
            pool_config: PoolConfig::default(),
            threshold: DEFAULT_THRESHOLD,
            exhausted_wait: Duration::ZERO,
            window: DEFAULT_WINDOW,
            window_wait: DEFAULT_WINDOW_WAIT,
        }
    }
}

impl SendConfig {
    /// The session parameters of `side`: the given pool, or a new one of `pool_config`, and a fresh recorder.
    pub(crate) fn into_params(self, side: Side) -> crate::Result<SessionParams> {
        let pool = match self.pool {
            Some(p) => p,
            None => Pool::new(self.pool_config)?,
        };
        Ok(SessionParams {
            pool,
            threshold: self.threshold,
            exhausted_wait: self.exhausted_wait,
            window: self.window.max(1),
            window_wait: self.window_wait,
            recorder: Recorder::new(side),
        })
    }
}

/// The sending options `ClientConfig` and `ServerConfig` share, over their `send: SendConfig` field: one
/// definition and one set of docs. `$payloads` names what the side sends ("request", "response"), `$peer` its peer.
macro_rules! send_options {
    ($payloads:literal, $peer:literal) => {
        /// Messages whose encoded size reaches `bytes` go through shared memory (default 64 KiB).
        pub fn threshold(mut self, bytes: usize) -> Self {
            self.send.threshold = bytes;
            self
        }
        /// When the pool's budget is used up (a peer holding many buffers), how long a call may wait for a
        /// buffer to come back before its messages go inline (default 0: inline at once). The wait is
        /// asynchronous, before the call's first message, and only after a message found the pool exhausted; no
        /// thread ever blocks on it.
        pub fn exhausted_wait(mut self, wait: std::time::Duration) -> Self {
            self.send.exhausted_wait = wait;
            self
        }
        #[doc = concat!("The in-flight window: bytes of our buffers the ", $peer, " may hold before a ", $payloads)]
        /// waits for releases (default 512 MiB; see [`crate::protocol::DEFAULT_WINDOW`]).
        pub fn window(mut self, bytes: u64) -> Self {
            self.send.window = bytes;
            self
        }
        #[doc = concat!("How long a ", $payloads, " waits for the window to open before going inline (default 1 s).")]
        pub fn window_wait(mut self, wait: std::time::Duration) -> Self {
            self.send.window_wait = wait;
            self
        }
        #[doc = concat!("The pool ", $payloads, " payloads are written into (default: a new pool with")]
        /// [`PoolConfig::default`](crate::PoolConfig::default)).
        pub fn pool(mut self, pool: crate::Pool) -> Self {
            self.send.pool = Some(pool);
            self
        }
        /// Configuration of the pool created when none is given.
        pub fn pool_config(mut self, config: crate::PoolConfig) -> Self {
            self.send.pool_config = config;
            self
        }
    };
}
pub(crate) use send_options;

/// Parameters a session is created with.
#[derive(Clone, Debug)]
pub(crate) struct SessionParams {
    pub(crate) pool: Pool,
    pub(crate) threshold: usize,
    /// How long the encoder may block for a pool buffer before sending inline.
    pub(crate) exhausted_wait: Duration,
    /// Bytes of our buffers the peer may hold before sending waits.
    pub(crate) window: u64,
    /// How long sending waits for the window before going inline.
    pub(crate) window_wait: Duration,
    /// The counters of the channel or server the session belongs to.
    pub(crate) recorder: Arc<Recorder>,
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
    /// Our segments registered with the peer.
    pub shared_segments: usize,
    /// Holds the peer has on our buffers (one per `sender` part not yet released).
    pub holds: usize,
    /// Bytes those holds cover (what the in-flight window limits).
    pub held_bytes: u64,
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
            held_bytes: self.held_bytes + o.held_bytes,
            returning: self.returning + o.returning,
        }
    }
}

/// A frame waiting for the writer task, with the descriptor it carries.
struct Outbound {
    kind: Kind,
    fd: Option<OwnedFd>,
}

/// Entries by (segment, generation).
type ByRegion<T> = HashMap<(u32, u32), Vec<T>>;

/// Takes one entry of `map` under `key`, dropping the key when none is left; `None` if there was none (a stale,
/// repeated or forged message).
fn take_one<T>(map: &mut ByRegion<T>, key: (u32, u32)) -> Option<T> {
    let v = map.get_mut(&key)?;
    let t = v.pop();
    if v.is_empty() {
        map.remove(&key);
    }
    t
}

/// One end of an established session.
pub(crate) struct Session {
    id: SessionId,
    role: Role,
    params: SessionParams,
    peer_pid: u32,
    /// Frames for the writer task; `None` once the session is closed.
    queue: Mutex<Option<UnboundedSender<Outbound>>>,
    /// Frames queued and not yet taken by the writer.
    queued: Arc<AtomicUsize>,
    /// The side channel, to shut it down when the session closes.
    socket: Arc<UnixStream>,
    alive: AtomicBool,
    header: http::HeaderValue,
    sender: sender::SenderState,
    receiver: receiver::ReceiverState,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("role", &self.role).field("peer_pid", &self.peer_pid).finish_non_exhaustive()
    }
}

impl Session {
    /// Creates the session on a side channel that has completed its handshake, registers it, and starts its
    /// reader and writer tasks on the I/O runtime.
    ///
    /// A client's session lives as long as its channel holds it. A server's session (`Role::Server`) is held by
    /// its reader task and lives exactly as long as the side-channel connection: when the peer goes, every
    /// resource of the session (descriptors included) goes with it.
    ///
    /// # Errors
    ///
    /// The I/O runtime could not be started.
    pub(crate) fn start(
        id: SessionId,
        role: Role,
        params: SessionParams,
        socket: Arc<UnixStream>,
        reader: FrameReader,
        peer_pid: u32,
    ) -> std::io::Result<Arc<Session>> {
        let (tx, rx) = unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let evictions = params.pool.evictions();
        let session = Arc::new(Session {
            id,
            role,
            params,
            peer_pid,
            queue: Mutex::new(Some(tx)),
            queued: queued.clone(),
            socket: socket.clone(),
            alive: AtomicBool::new(true),
            header: http::HeaderValue::from_str(&id.iter().map(|b| format!("{b:02x}")).collect::<String>())
                .expect("hex is a valid header value"),
            sender: sender::SenderState::new(evictions),
            receiver: receiver::ReceiverState::default(),
        });
        lock(&REGISTRY).insert((id, role), Arc::downgrade(&session));
        // The tasks hold the session weakly: it ends when its owner (the channel, the server) lets go, not when a
        // task gets round to noticing.
        let weak = Arc::downgrade(&session);
        let keep = (role == Role::Server).then(|| session.clone());
        let started = crate::io::spawn(Session::read_loop(weak.clone(), keep, socket.clone(), reader))
            .and_then(|_| crate::io::spawn(Session::write_loop(weak, socket, rx, queued)));
        if let Err(e) = started {
            session.close();
            return Err(e);
        }
        session.params.recorder.session(1);
        tracing::debug!(?role, peer_pid, "shmgrpc session established");
        Ok(session)
    }

    /// The counters of the channel or server this session belongs to.
    pub(crate) fn recorder(&self) -> &Arc<Recorder> {
        &self.params.recorder
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
        let peer = self.receiver.peer.stats();
        let (holds, held_bytes, shared_segments) = self.sender.figures();
        SessionStats {
            sessions: 1,
            peer_segments: peer.segments,
            peer_bytes: peer.bytes,
            shared_segments,
            holds,
            held_bytes,
            returning: self.receiver.returning_count(),
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
        self.receiver.peer.contains(data) || self.params.pool.contains(data)
    }

    /// Queues a frame for the peer. Never blocks, on any thread, inside a runtime or not. A peer that lets the
    /// queue fill up is not reading its side channel: the session is closed rather than let it cost anyone time.
    pub(crate) fn send(&self, kind: Kind, fd: Option<OwnedFd>) -> std::io::Result<()> {
        let closed = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "session closed");
        {
            let queue = lock(&self.queue);
            let tx = queue.as_ref().ok_or_else(closed)?;
            // Counted before it is sent, so the writer's decrement can never run ahead of it.
            if self.queued.fetch_add(1, Ordering::AcqRel) < MAX_QUEUED_FRAMES {
                return tx.send(Outbound { kind, fd }).map_err(|_| {
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                    closed()
                });
            }
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        tracing::debug!(role = ?self.role, "the peer does not read its side channel; closing the session");
        self.params.recorder.record_both(Event::PeerRefusal);
        self.close();
        Err(closed())
    }

    /// The writer task: sends queued frames, several in one write when they pile up, a frame with a descriptor in
    /// a `sendmsg` of its own. Ends when the session closes or a write fails or stalls (then it closes the
    /// session).
    async fn write_loop(
        weak: Weak<Session>,
        sock: Arc<UnixStream>,
        mut rx: UnboundedReceiver<Outbound>,
        queued: Arc<AtomicUsize>,
    ) {
        let mut buf = Vec::new();
        let result: std::io::Result<()> = async {
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                while let Some(out) = next.take() {
                    queued.fetch_sub(1, Ordering::AcqRel);
                    let frame = wire::frame(out.kind);
                    match out.fd {
                        Some(fd) => {
                            side_channel::write_all(&sock, &buf, None).await?;
                            buf.clear();
                            let mut one = Vec::new();
                            wire::encode_frame(&frame, &mut one);
                            side_channel::write_all(&sock, &one, Some(std::os::fd::AsFd::as_fd(&fd))).await?;
                        }
                        None => wire::encode_frame(&frame, &mut buf),
                    }
                    if buf.len() < COALESCE {
                        next = rx.try_recv().ok();
                    }
                }
                side_channel::write_all(&sock, &buf, None).await?;
                buf.clear();
            }
            Ok(())
        }
        .await;
        if let Err(e) = result
            && let Some(s) = weak.upgrade()
        {
            tracing::debug!(error = %e, "side-channel write failed; closing the session");
            s.close();
        }
    }

    /// The reader task: registrations, their answers, releases, returns. Ends with the connection or with the
    /// session.
    async fn read_loop(
        weak: Weak<Session>,
        keep: Option<Arc<Session>>,
        sock: Arc<UnixStream>,
        mut reader: FrameReader,
    ) {
        let why = loop {
            let (msg, fd) = match reader.next(&sock).await {
                Ok(Some(m)) => m,
                Ok(None) => break "peer closed the side channel".to_string(),
                Err(e) => break format!("side channel: {e}"),
            };
            // Upgraded for this frame only: the task never keeps the session alive while it waits.
            let Some(this) = weak.upgrade() else { break "session dropped".to_string() };
            if let Err(why) = this.on_frame(msg.kind.expect("decode_frame checks"), fd) {
                break why;
            }
        };
        if let Some(this) = weak.upgrade() {
            tracing::debug!(role = ?this.role, reason = %why, "shmgrpc session closed");
            this.close();
        }
        drop(keep);
    }

    /// Handles one frame from the peer; `Err` ends the session.
    fn on_frame(&self, kind: Kind, fd: Option<OwnedFd>) -> Result<(), String> {
        match kind {
            Kind::Register(reg) => self.on_register(reg, fd),
            Kind::Registered(ack) => {
                self.on_registered(ack);
                Ok(())
            }
            Kind::Release(rel) => {
                self.on_release(rel.segment, rel.generation);
                Ok(())
            }
            Kind::Returned(ret) => {
                self.on_returned(ret.segment, ret.generation);
                Ok(())
            }
            Kind::Forget(f) => {
                self.on_forget(f.segment);
                Ok(())
            }
            Kind::Refused(r) => Err(format!("peer refused: {}", r.reason)),
            _ => Err("unexpected frame on an established side channel".to_string()),
        }
    }

    /// Ends the session: what the peer held comes back, the peer's mappings go (readers keep theirs until they
    /// drop them), and everything waiting on the session is woken.
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
        side_channel::shutdown(&self.socket);
        let back = self.sender.close();
        self.receiver.close();
        self.params.recorder.session(-1);
        tracing::debug!(role = ?self.role, reclaimed = back, "shmgrpc session torn down");
    }

    /// Woken when the peer registers (or we refuse) a segment, or the session closes.
    pub(crate) fn registrations(&self) -> &Arc<Notify> {
        &self.receiver.registered
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

// The per-session cap must never exceed the process-wide one.
const _: () = assert!(MAX_SESSION_PEER_BYTES <= crate::protocol::MAX_PROCESS_PEER_BYTES);
