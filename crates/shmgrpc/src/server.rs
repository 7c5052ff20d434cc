//! The server side: [`ShmServer`] runs the side channel; [`ShmLayer`] plugs shmgrpc into a tonic server.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use shmgrpc::demo::{BlobServer, BlobService};
//! let shm = shmgrpc::ShmServer::new(shmgrpc::ServerConfig::default())?;
//! tonic::transport::Server::builder()
//!     .layer(shm.layer())
//!     .add_service(BlobServer::new(BlobService::default()))
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! The layer answers discovery (`shmgrpc.v1.Session/Hello`) itself, and for a call that names a live session in
//! its `shmgrpc-session` header, polls the response body with that session current, so the codec can send large
//! responses through shared memory. Requests are decoded by the codec whatever the layer does. A plain gRPC client
//! never names a session and is served exactly as by plain tonic.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tonic::body::Body;

use crate::client::SESSION_HEADER;
use crate::codec::SessionBody;
use crate::error::{Error, Result};
use crate::pool::{Pool, PoolConfig};
use crate::proto::v1::session_server::{Session as SessionRpc, SessionServer};
use crate::proto::v1::{self, HelloRequest, HelloResponse};
use crate::segment::{Backend, Segment, SegmentHandle, SegmentOptions};
use crate::session::{PROTOCOL_VERSION, Role, SendConfig, Session, SessionParams};
use crate::wire::{self, Kind};

const HELLO_PATH: &str = "/shmgrpc.v1.Session/Hello";
const TICKET_TTL: Duration = Duration::from_secs(60);
const MAX_TICKETS: usize = 4096;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Server configuration.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    side_channel: Option<PathBuf>,
    allowed_uids: Option<HashSet<u32>>,
    send: SendConfig,
}

impl ServerConfig {
    /// Where the side-channel socket goes (default: a fresh path in the temporary directory).
    pub fn side_channel(mut self, path: impl Into<PathBuf>) -> Self {
        self.side_channel = Some(path.into());
        self
    }
    /// The uids allowed to open a session (default: the server's own uid and root). Others are served inline.
    pub fn allowed_uids(mut self, uids: impl IntoIterator<Item = u32>) -> Self {
        self.allowed_uids = Some(uids.into_iter().collect());
        self
    }
    /// The pool response payloads are written into (default: a new pool with [`PoolConfig::default`]).
    pub fn pool(mut self, pool: Pool) -> Self {
        self.send.pool = Some(pool);
        self
    }
    /// Configuration of the pool created when none is given.
    pub fn pool_config(mut self, config: PoolConfig) -> Self {
        self.send.pool_config = config;
        self
    }
    /// Messages whose encoded size reaches `bytes` go through shared memory (default 64 KiB).
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.send.threshold = bytes;
        self
    }
    /// When the pool's budget is used up (a peer holding many buffers), how long sending a message may wait for a
    /// buffer before the message goes inline instead (default 0: inline at once). The wait blocks the thread that
    /// encodes, so keep it short.
    pub fn exhausted_wait(mut self, wait: Duration) -> Self {
        self.send.exhausted_wait = wait;
        self
    }
}

struct Shared {
    path: PathBuf,
    allowed: HashSet<u32>,
    params: SessionParams,
    tickets: Mutex<HashMap<[u8; 32], Instant>>,
    /// Sessions opened on the side channel (closed ones are pruned as new ones come).
    sessions: Mutex<Vec<Arc<Session>>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server half of shmgrpc: owns the side-channel socket and the sessions opened on it. Dropping it removes the
/// socket and ends every session.
pub struct ShmServer {
    shared: Arc<Shared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ShmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmServer").field("side_channel", &self.shared.path).finish_non_exhaustive()
    }
}

impl ShmServer {
    /// Binds the side channel and starts accepting sessions.
    pub fn new(config: ServerConfig) -> Result<ShmServer> {
        let params = config.send.into_params()?;
        let me = rustix::process::getuid().as_raw();
        let allowed = config.allowed_uids.unwrap_or_else(|| [me, 0].into_iter().collect());
        let path = match config.side_channel {
            Some(p) => p,
            None => {
                let mut r = [0u8; 8];
                getrandom::fill(&mut r).map_err(|e| Error::InvalidArgument(format!("no randomness: {e}")))?;
                std::env::temp_dir().join(format!("shmgrpc-{}-{:016x}.sock", std::process::id(), u64::from_le_bytes(r)))
            }
        };
        let os = |op, e| Error::Os { op, backend: Backend::Memfd, source: e };
        let listener = UnixListener::bind(&path).map_err(|e| os("bind side channel", e))?;
        // Only the allowed uids may connect; the uid check on every connection is what enforces it.
        let mode = if allowed.iter().all(|&u| u == me || u == 0) { 0o600 } else { 0o666 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(|e| os("chmod", e))?;
        let shared = Arc::new(Shared {
            path,
            allowed,
            params,
            tickets: Mutex::default(),
            sessions: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("shmgrpc-accept".into())
            .spawn(move || accept_loop(s, listener))
            .map_err(|e| os("spawn", e))?;
        Ok(ShmServer { shared, accept: Some(accept) })
    }

    /// The tower layer to add to a tonic server (`Server::builder().layer(shm.layer())`).
    pub fn layer(&self) -> ShmLayer {
        ShmLayer { shared: self.shared.clone() }
    }

    /// The side-channel socket's path.
    pub fn side_channel_path(&self) -> &Path {
        &self.shared.path
    }

    /// The pool response payloads are written into.
    pub fn pool(&self) -> &Pool {
        &self.shared.params.pool
    }

    /// Figures summed over the open sessions.
    pub fn session_stats(&self) -> crate::SessionStats {
        lock(&self.shared.sessions).iter().map(|s| s.stats()).fold(Default::default(), |a, b| a + b)
    }

    /// Sessions currently open.
    pub fn sessions(&self) -> usize {
        lock(&self.shared.sessions).iter().filter(|s| s.is_alive()).count()
    }
}

impl Drop for ShmServer {
    /// Stops accepting, ends every session, and frees the pool's idle buffers, all before returning: a process
    /// that exits right after dropping its server leaves nothing behind (POSIX names included).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag, and wait for it.
        let _ = UnixStream::connect(&self.shared.path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.shared.path);
        for s in lock(&self.shared.sessions).drain(..) {
            s.close();
        }
        self.shared.params.pool.trim();
    }
}

fn accept_loop(shared: Arc<Shared>, listener: UnixListener) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(stream) = conn else { continue };
        let s = shared.clone();
        let spawned = std::thread::Builder::new().name("shmgrpc-handshake".into()).spawn(move || {
            if let Err(why) = handshake(&s, stream) {
                tracing::info!(why, "shmgrpc session refused");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a handshake thread");
        }
    }
}

/// The server's half of the side-channel handshake (blocking), then the session's reader.
fn handshake(shared: &Shared, sock: UnixStream) -> std::result::Result<(), &'static str> {
    let refuse = |sock: &UnixStream, why: &'static str| {
        let _ = wire::write_frame(sock, &wire::frame(Kind::Refused(v1::Refused { reason: why.into() })), None);
        why
    };
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|_| "socket")?;
    sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|_| "socket")?;
    let cred = rustix::net::sockopt::socket_peercred(&sock).map_err(|_| "no peer credentials")?;
    if !shared.allowed.contains(&cred.uid.as_raw()) {
        return Err(refuse(&sock, "uid not allowed"));
    }
    let attach = match wire::read_frame(&sock) {
        Ok(Some((msg, fds))) if fds.is_empty() => match msg.kind {
            Some(Kind::Attach(a)) => a,
            _ => return Err(refuse(&sock, "expected attach")),
        },
        _ => return Err(refuse(&sock, "expected attach")),
    };
    if attach.version != PROTOCOL_VERSION {
        return Err(refuse(&sock, "unsupported protocol version"));
    }
    let ticket: [u8; 32] = attach.ticket.as_ref().try_into().map_err(|_| refuse(&sock, "bad ticket"))?;
    match lock(&shared.tickets).remove(&ticket) {
        Some(issued) if issued.elapsed() < TICKET_TTL => {}
        _ => return Err(refuse(&sock, "unknown or expired ticket")),
    }
    // The challenge: random bytes in a sealed memfd. Only a process that can map it can answer.
    let mut challenge = Segment::create(32, &SegmentOptions::new(Backend::Memfd)).map_err(|_| "challenge")?;
    getrandom::fill(challenge.as_mut_slice()).map_err(|_| "randomness")?;
    let SegmentHandle::Memfd(fd) = challenge.share().map_err(|_| "share")? else { return Err("memfd") };
    let msg = wire::frame(Kind::Challenge(v1::Challenge { len: 32 }));
    wire::write_frame(&sock, &msg, Some(std::os::fd::AsFd::as_fd(&fd))).map_err(|_| "write")?;
    drop(fd);
    let proof = match wire::read_frame(&sock) {
        Ok(Some((msg, fds))) if fds.is_empty() => match msg.kind {
            Some(Kind::Proof(p)) => p,
            _ => return Err(refuse(&sock, "expected proof")),
        },
        _ => return Err(refuse(&sock, "expected proof")),
    };
    if proof.answer.as_ref() != challenge.as_slice() {
        return Err(refuse(&sock, "wrong answer to the challenge"));
    }
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|_| "randomness")?;
    let pid = cred.pid.as_raw_pid() as u32;
    let session = Session::start(id, Role::Server, shared.params.clone(), sock, pid).map_err(|_| "session thread")?;
    {
        let mut sessions = lock(&shared.sessions);
        sessions.retain(|s| s.is_alive());
        sessions.push(session.clone());
    }
    let welcome = Kind::Welcome(v1::Welcome { session: id.to_vec().into(), threshold: shared.params.threshold as u64 });
    // The first frame through the session's writer: nothing else is sent before the client has its welcome.
    session.send(welcome, None).map_err(|_| "write")?;
    // The server keeps the session until it closes; this thread is done.
    drop(session);
    Ok(())
}

/// The session of a call, in the request's extensions (see [`loan`]).
#[derive(Clone)]
struct CallSession(Arc<Session>);

/// A buffer to write a response payload into and send without a copy ([`crate::Loan::freeze`] it into a `bytes`
/// field of the response). Shared memory when the call came through a shmgrpc session, ordinary memory otherwise.
pub fn loan<T>(request: &tonic::Request<T>, len: usize) -> crate::Loan {
    match request.extensions().get::<CallSession>() {
        Some(CallSession(s)) => s.loan(len),
        None => crate::Loan::heap(len),
    }
}

/// Answers discovery.
struct Hello {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl SessionRpc for Hello {
    async fn hello(
        &self,
        _request: tonic::Request<HelloRequest>,
    ) -> std::result::Result<tonic::Response<HelloResponse>, tonic::Status> {
        let mut ticket = [0u8; 32];
        getrandom::fill(&mut ticket).map_err(|_| tonic::Status::internal("no randomness"))?;
        {
            let mut tickets = lock(&self.shared.tickets);
            tickets.retain(|_, t| t.elapsed() < TICKET_TTL);
            if tickets.len() >= MAX_TICKETS {
                return Err(tonic::Status::resource_exhausted("too many pending shmgrpc handshakes"));
            }
            tickets.insert(ticket, Instant::now());
        }
        Ok(tonic::Response::new(HelloResponse {
            version: PROTOCOL_VERSION,
            side_channel: self.shared.path.to_string_lossy().into_owned(),
            ticket: ticket.to_vec().into(),
        }))
    }
}

/// The tower layer of [`ShmServer`].
#[derive(Clone)]
pub struct ShmLayer {
    shared: Arc<Shared>,
}

impl<S> tower_layer::Layer<S> for ShmLayer {
    type Service = ShmService<S>;

    fn layer(&self, inner: S) -> ShmService<S> {
        ShmService { inner, hello: SessionServer::new(Hello { shared: self.shared.clone() }) }
    }
}

/// The service [`ShmLayer`] wraps around a tonic router.
#[derive(Clone)]
pub struct ShmService<S> {
    inner: S,
    hello: SessionServer<Hello>,
}

impl<S, ResBody> tower_service::Service<http::Request<Body>> for ShmService<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, std::result::Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() == HELLO_PATH {
            let mut hello = self.hello.clone();
            return Box::pin(async move {
                match tower_service::Service::call(&mut hello, req).await {
                    Ok(resp) => Ok(resp),
                    Err(never) => match never {},
                }
            });
        }
        let session = req
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|hex| Session::lookup_hex(hex, Role::Server));
        let mut req = req;
        if let Some(s) = &session {
            req.extensions_mut().insert(CallSession(s.clone()));
        }
        // The standard tower dance: call the instance that was made ready, keep a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match session {
                Some(s) => resp.map(|b| Body::new(SessionBody::new(b, s))),
                None => resp.map(Body::new),
            })
        })
    }
}
