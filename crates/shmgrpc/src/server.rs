//! The server side: [`ShmServer`] runs the side channel; [`ShmLayer`] plugs shmgrpc into a tonic server.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use shmgrpc_demo::{BlobServer, BlobService};
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

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tonic::body::Body;

use crate::body::{HoldBack, SessionBody};
pub use crate::config::ServerConfig;
use crate::config::SessionParams;
use crate::error::{Error, Result};
use crate::handshake::{self, Tickets};
use crate::pool::Pool;
use crate::proto::v1::session_server::{Session as SessionRpc, SessionServer};
use crate::proto::v1::{self, HelloRequest, HelloResponse};
use crate::protocol::Side;
use crate::protocol::{CALL_HEADER, HELLO_PATH, MAX_HANDSHAKES, SESSION_HEADER};
use crate::session::Session;
use crate::side_channel;
use crate::stats::{Event, TransferStats};
use crate::sync::lock;
use crate::wire::Kind;

struct Shared {
    path: PathBuf,
    allowed: HashSet<u32>,
    params: SessionParams,
    tickets: Tickets,
    /// The highest protocol version this server speaks.
    max_version: u32,
    /// The process that runs the server: a child made by `fork` inherits it, never serves it, and must leave the
    /// socket file to the parent.
    pid: u32,
    /// Sessions opened on the side channel (each is held by its own reader task; gone ones are pruned as new
    /// ones come).
    sessions: Mutex<Vec<Weak<Session>>>,
    /// Handshakes in progress.
    handshakes: Arc<tokio::sync::Semaphore>,
    stop: AtomicBool,
}

/// The server half of shmgrpc: owns the side-channel socket and the sessions opened on it. Dropping it removes the
/// socket and ends every session.
///
/// Its side channel is served by the process's I/O thread (`shmgrpc-io`), shared by every session of the
/// process: the number of threads does not grow with the number of clients.
pub struct ShmServer {
    shared: Arc<Shared>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for ShmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmServer").field("side_channel", &self.shared.path).finish_non_exhaustive()
    }
}

impl ShmServer {
    /// Binds the side channel and starts accepting sessions (on the process's I/O thread, started if needed).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the side-channel socket cannot be bound or the I/O thread cannot start;
    /// [`Error::Randomness`] for the ticket secret or the socket's name; pool configuration errors
    /// ([`Error::InvalidArgument`]) when a pool is created from [`ServerConfig::pool_config`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let shm = shmgrpc::ShmServer::new(shmgrpc::ServerConfig::default())?;
    /// tonic::transport::Server::builder()
    ///     .layer(shm.layer())
    ///     .add_service(shmgrpc_demo::BlobServer::new(shmgrpc_demo::BlobService))
    ///     .serve("127.0.0.1:50051".parse()?)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn new(config: ServerConfig) -> Result<ShmServer> {
        let params = config.send.into_params(Side::Server)?;
        let os = |op, source| Error::Io { op, source };
        let me = rustix::process::getuid().as_raw();
        let allowed = config.allowed_uids.unwrap_or_else(|| [me, 0].into_iter().collect());
        let path = match config.side_channel {
            Some(p) if side_channel::abstract_name(&p).is_some() => p,
            // The path is what `Hello` tells clients: absolute.
            Some(p) => std::path::absolute(&p).map_err(|e| os("resolve the side channel's path", e))?,
            None => {
                let mut r = [0u8; 8];
                getrandom::fill(&mut r).map_err(Error::randomness("a side-channel path"))?;
                std::env::temp_dir().join(format!("shmgrpc-{}-{:016x}.sock", crate::pid::id(), u64::from_le_bytes(r)))
            }
        };
        let tickets = Tickets::new().map_err(Error::randomness("the ticket secret"))?;
        let listener = side_channel::bind(&path).map_err(|e| os("bind side channel", e))?;
        // Only the allowed uids may connect; the uid check on every connection is what enforces it (an abstract
        // socket has no mode: the uid check alone).
        if side_channel::abstract_name(&path).is_none() {
            let mode = if allowed.iter().all(|&u| u == me || u == 0) { 0o600 } else { 0o666 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(|e| os("chmod", e))?;
        }
        listener.set_nonblocking(true).map_err(|e| os("fcntl", e))?;
        let rt = crate::io::handle().map_err(|e| os("start the shmgrpc-io thread", e))?;
        let listener = {
            let _enter = rt.enter();
            tokio::net::UnixListener::from_std(listener).map_err(|e| os("register side channel", e))?
        };
        let shared = Arc::new(Shared {
            path,
            allowed,
            params,
            tickets,
            max_version: config.protocol_version,
            pid: crate::pid::id(),
            sessions: Mutex::default(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            stop: AtomicBool::new(false),
        });
        let accept = rt.spawn(accept_loop(shared.clone(), listener));
        Ok(ShmServer { shared, accept: Some(accept) })
    }

    /// The tower layer to add to a tonic server (`Server::builder().layer(shm.layer())`).
    pub fn layer(&self) -> ShmLayer {
        ShmLayer { shared: self.shared.clone() }
    }

    /// The side-channel socket's path (`@name` for an abstract socket).
    pub fn side_channel_path(&self) -> &Path {
        &self.shared.path
    }

    /// The pool response payloads are written into.
    pub fn pool(&self) -> &Pool {
        &self.shared.params.pool
    }

    /// This server's transfer counters: messages and bytes of its calls, through shared memory and inline, fallbacks
    /// by reason, and refusals of its peers (the process-wide sum is [`crate::stats::snapshot`]).
    pub fn stats(&self) -> TransferStats {
        self.shared.params.recorder.snapshot()
    }

    /// The answer to discovery from a client that speaks up to `version`: the version both speak, the side
    /// channel's path and a fresh ticket (stateless until used).
    pub(crate) fn hello_response(&self, version: u32) -> std::result::Result<HelloResponse, tonic::Status> {
        hello_response(&self.shared, version)
    }

    pub(crate) fn recorder(&self) -> &Arc<crate::stats::Recorder> {
        &self.shared.params.recorder
    }

    /// Figures summed over the open sessions.
    pub fn session_stats(&self) -> crate::SessionStats {
        self.live().iter().map(|s| s.stats()).fold(Default::default(), |a, b| a + b)
    }

    /// Sessions currently open.
    pub fn sessions(&self) -> usize {
        self.live().iter().filter(|s| s.is_alive()).count()
    }

    fn live(&self) -> Vec<Arc<Session>> {
        lock(&self.shared.sessions).iter().filter_map(Weak::upgrade).collect()
    }
}

impl Drop for ShmServer {
    /// Stops accepting, ends every session, and frees the pool's idle buffers, all before returning: a process
    /// that exits right after dropping its server leaves nothing behind (POSIX names included).
    fn drop(&mut self) {
        if self.shared.pid != crate::pid::id() {
            // A forked child's copy: the socket, the sessions and the pool are the parent's, and so is the accept
            // task (on the parent's runtime, which the child never runs).
            std::mem::forget(self.accept.take());
            return;
        }
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            t.abort();
        }
        if side_channel::abstract_name(&self.shared.path).is_none() {
            let _ = std::fs::remove_file(&self.shared.path);
        }
        let sessions: Vec<Weak<Session>> = lock(&self.shared.sessions).drain(..).collect();
        for s in sessions.iter().filter_map(Weak::upgrade) {
            s.close();
        }
        self.shared.params.pool.trim();
    }
}

/// Accepts side-channel connections on the I/O runtime; each handshake is a task of its own, bounded in time and
/// in number.
async fn accept_loop(shared: Arc<Shared>, listener: tokio::net::UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                tracing::debug!(error = %e, "side-channel accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
            shared.params.recorder.record_both(Event::PeerRefusal);
            tracing::debug!("too many side-channel handshakes in progress; connection closed");
            continue;
        };
        let s = shared.clone();
        tokio::spawn(async move {
            if let Err(why) = establish(&s, stream).await {
                s.params.recorder.record_both(Event::PeerRefusal);
                tracing::debug!(why, "shmgrpc session refused");
            }
            drop(permit);
        });
    }
}

/// The server's half of the handshake, then the session.
async fn establish(shared: &Shared, stream: tokio::net::UnixStream) -> std::result::Result<(), &'static str> {
    let accepted = handshake::accept(stream, &shared.allowed, &shared.tickets).await?;
    if shared.stop.load(Ordering::Acquire) {
        return Err("server stopped");
    }
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|_| "randomness")?;
    let session = Session::start(id, Side::Server, shared.params.clone(), accepted).map_err(|_| "session tasks")?;
    {
        let mut sessions = lock(&shared.sessions);
        sessions.retain(|s| s.strong_count() > 0);
        sessions.push(Arc::downgrade(&session));
    }
    let welcome = Kind::Welcome(v1::Welcome { session: id.to_vec().into(), threshold: shared.params.threshold as u64 });
    // The first frame through the session's writer: nothing else is sent before the client has its welcome.
    session.send(welcome, None).map_err(|_| "write")?;
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
    /// Answers discovery at no cost to the server: tickets are stateless until used (see `handshake`).
    async fn hello(
        &self,
        request: tonic::Request<HelloRequest>,
    ) -> std::result::Result<tonic::Response<HelloResponse>, tonic::Status> {
        Ok(tonic::Response::new(hello_response(&self.shared, request.get_ref().version)?))
    }
}

/// The answer to discovery (see [`ShmServer::hello_response`]).
fn hello_response(shared: &Shared, version: u32) -> std::result::Result<HelloResponse, tonic::Status> {
    let version = handshake::negotiate(version.min(shared.max_version)).map_err(tonic::Status::failed_precondition)?;
    let ticket = shared.tickets.issue().map_err(|_| tonic::Status::internal("no randomness"))?;
    Ok(HelloResponse { version, side_channel: shared.path.to_string_lossy().into_owned(), ticket })
}

/// The tower layer of [`ShmServer`].
#[derive(Clone)]
pub struct ShmLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ShmLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmLayer").field("side_channel", &self.shared.path).finish_non_exhaustive()
    }
}

impl<S> tower_layer::Layer<S> for ShmLayer {
    type Service = ShmService<S>;

    fn layer(&self, inner: S) -> ShmService<S> {
        ShmService {
            inner,
            hello: SessionServer::new(Hello { shared: self.shared.clone() }),
            shared: self.shared.clone(),
        }
    }
}

/// The service [`ShmLayer`] wraps around a tonic router.
#[derive(Clone)]
pub struct ShmService<S> {
    inner: S,
    hello: SessionServer<Hello>,
    shared: Arc<Shared>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for ShmService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmService").field("inner", &self.inner).finish_non_exhaustive()
    }
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
        // The call's session and number (§6): a header that names no live session of ours leaves the call without
        // one; a number that is missing or not a decimal number leaves it unnumbered, served as in version 2.
        let text = |name| req.headers().get(name).and_then(|v: &http::HeaderValue| v.to_str().ok());
        let (session, call) =
            match text(SESSION_HEADER).and_then(|value| Session::of_call(value, text(CALL_HEADER), Side::Server)) {
                Some((s, call)) => (Some(s), call),
                None => (None, None),
            };
        let mut req = req;
        if let Some(s) = &session {
            req.extensions_mut().insert(CallSession(s.clone()));
        }
        // References in the request may overtake their segments' registrations: hold them back until in. (Calls
        // without a session pass through the same wrapper, which counts their messages for this server.)
        let recorder = self.shared.params.recorder.clone();
        let numbered = session.clone().zip(call);
        req = req.map(|b| Body::new(HoldBack::new(b, Side::Server, recorder.clone(), numbered)));
        let threshold = self.shared.params.threshold;
        // The standard tower dance: call the instance that was made ready, keep a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(match session {
                Some(s) => resp.map(|b| Body::new(SessionBody::new(b, s, call))),
                None => resp.map(|b| Body::new(SessionBody::without_session(b, recorder, threshold, None))),
            })
        })
    }
}
