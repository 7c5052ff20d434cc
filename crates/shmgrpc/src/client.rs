//! The client side: [`ShmChannel`], a tonic channel that establishes a shmgrpc session with the server when it can.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use shmgrpc_demo::{BlobClient, Payload};
//! let channel = shmgrpc::ShmChannel::connect("unix:/tmp/blob.sock").await?;
//! let mut client = BlobClient::new(channel); // generated with .codec_path("shmgrpc::ShmCodec")
//! # Ok(()) }
//! ```
//!
//! Connecting opens an ordinary tonic channel, then asks the server for its side channel (`shmgrpc.v1.Session/
//! Hello` on the gRPC connection itself), connects to it, checks the server's uid, and answers a challenge written
//! in a memfd the server sends: only a peer that shares memory with us can. Whatever fails, the channel still
//! works: every message then goes inline, and [`ShmChannel::fallback`] says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};

use crate::body::{HoldBack, SessionBody};
pub use crate::config::ClientConfig;
use crate::config::SessionParams;
use crate::handshake;
use crate::pool::Pool;
use crate::proto::v1::HelloRequest;
use crate::proto::v1::session_client::SessionClient;
use crate::protocol::HANDSHAKE_TIMEOUT;
use crate::protocol::Side;
use crate::session::Session;
use crate::stats::{Fallback, Recorder, TransferStats};
use crate::sync::{lock, read, write};

pub use crate::protocol::{CALL_HEADER, DEFAULT_THRESHOLD, SESSION_HEADER};

/// Errors of [`ShmChannel::connect`]: only the gRPC connection itself can fail; shared memory falls back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The target is not `unix:/path`, `http://host:port` or `host:port`.
    #[error("invalid target {0:?}: expected unix:/path, http://host:port or host:port")]
    InvalidTarget(String),
    /// The gRPC connection failed.
    #[error("connecting to {target}: {source}")]
    Transport {
        /// The target.
        target: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The pool could not be created.
    #[error(transparent)]
    Pool(#[from] crate::Error),
}

/// A gRPC channel that sends large messages through shared memory when the server supports it (see the module
/// docs). Cheap to clone; clones share the connection and the session.
///
/// If the session ends (the server restarted, the side channel broke), calls go on inline at once, and the channel
/// tries to open a new session in the background, at most once a second.
#[derive(Clone, Debug)]
pub struct ShmChannel {
    inner: Channel,
    state: Arc<State>,
}

/// What clones of a channel share.
#[derive(Debug)]
struct State {
    /// Session parameters; `None` when shared memory is switched off.
    params: Option<SessionParams>,
    /// This channel's counters (the sessions' recorder when shared memory is on).
    recorder: Arc<Recorder>,
    /// Messages from this size up are meant for shared memory.
    threshold: usize,
    /// The highest protocol version to ask for.
    version: u32,
    /// The server's Unix socket, when we reached it through one (where to look for its side channel).
    unix: Option<PathBuf>,
    session: RwLock<Option<Arc<SessionGuard>>>,
    fallback: Mutex<Option<Fallback>>,
    /// When a new session was last tried, and whether a try is running.
    retry: Mutex<(Option<Instant>, bool)>,
}

/// Smallest pause between two attempts to reopen a session.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The endpoint settings shmgrpc uses: large HTTP/2 windows and `TCP_NODELAY`, so inline messages are not
/// throttled by flow control.
fn endpoint(target: &str) -> Result<(Endpoint, Option<PathBuf>), ConnectError> {
    let bad = || ConnectError::InvalidTarget(target.to_string());
    let (uri, unix) = if let Some(path) = target.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad());
        }
        ("http://localhost".to_string(), Some(PathBuf::from(path)))
    } else if target.starts_with("http://") || target.starts_with("https://") {
        (target.to_string(), None)
    } else {
        (format!("http://{target}"), None)
    };
    let ep = Endpoint::from_shared(uri)
        .map_err(|_| bad())?
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10));
    Ok((ep, unix))
}

impl ShmChannel {
    /// Connects to `target` (`unix:/path`, `http://host:port` or `host:port`) with the default configuration.
    ///
    /// Shared memory is tried on connect (discovery, then the side-channel handshake); when it cannot be had the
    /// channel works inline and [`ShmChannel::fallback`] says why. Only the gRPC connection itself can fail.
    ///
    /// # Errors
    ///
    /// [`ConnectError`]: the target does not parse, or the gRPC connection cannot be made.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
    /// let channel = shmgrpc::ShmChannel::connect("unix:/run/blob.sock").await?;
    /// if let Some(why) = channel.fallback() {
    ///     eprintln!("messages go inline: {why}");
    /// }
    /// let mut client = shmgrpc_demo::BlobClient::new(channel.clone());
    /// let reply = client.echo(shmgrpc_demo::payload(20 << 20, 1)).await?;
    /// println!("{:?}", channel.stats());
    /// # drop(reply); Ok(()) }
    /// ```
    pub async fn connect(target: &str) -> Result<ShmChannel, ConnectError> {
        Self::connect_with(target, ClientConfig::default()).await
    }

    /// Connects to `target` with `config`.
    pub async fn connect_with(target: &str, config: ClientConfig) -> Result<ShmChannel, ConnectError> {
        let (ep, unix) = endpoint(target)?;
        let transport = |source| ConnectError::Transport { target: target.to_string(), source };
        let channel = match unix.clone() {
            Some(path) => ep
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
                }))
                .await
                .map_err(transport)?,
            None => ep.connect().await.map_err(transport)?,
        };
        Self::start(channel, config, unix).await
    }

    /// Establishes a session over an existing channel (for channels built with custom tonic settings).
    pub async fn over(channel: Channel, config: ClientConfig) -> Result<ShmChannel, ConnectError> {
        Self::start(channel, config, None).await
    }

    /// The channel over `channel`, reached through the Unix socket `unix` if it was.
    async fn start(channel: Channel, config: ClientConfig, unix: Option<PathBuf>) -> Result<ShmChannel, ConnectError> {
        let (threshold, version) = (config.send.threshold, config.protocol_version);
        let params = if config.shared_memory { Some(config.send.into_params(Side::Client)?) } else { None };
        let recorder = params.as_ref().map_or_else(|| Recorder::new(Side::Client), |p| p.recorder.clone());
        let state = Arc::new(State {
            params,
            recorder,
            threshold,
            version,
            unix,
            session: RwLock::new(None),
            fallback: Mutex::new(None),
            retry: Mutex::new((Some(Instant::now()), false)),
        });
        if let Some(params) = &state.params {
            state.settle(establish(&channel, params.clone(), version, state.unix.as_deref()).await);
        }
        Ok(ShmChannel { inner: channel, state })
    }

    fn session(&self) -> Option<Arc<SessionGuard>> {
        read(&self.state.session).clone()
    }

    /// Whether large messages currently go through shared memory.
    pub fn is_shared_memory(&self) -> bool {
        self.session().is_some_and(|s| s.is_alive())
    }

    /// The protocol version of the current session (docs/protocol.md §2), `None` without one.
    pub fn protocol_version(&self) -> Option<u32> {
        self.session().filter(|s| s.is_alive()).map(|s| s.version())
    }

    /// This channel's transfer counters (all its clones together): messages and bytes through shared memory and
    /// inline, fallbacks by reason, refusals of the server's frames (the process-wide sum is
    /// [`crate::stats::snapshot`]).
    pub fn stats(&self) -> TransferStats {
        self.state.recorder.snapshot()
    }

    /// Figures of the session (all zero without one).
    pub fn session_stats(&self) -> crate::SessionStats {
        self.session().map(|s| s.stats()).unwrap_or_default()
    }

    /// Why this channel sends inline, if it does.
    pub fn fallback(&self) -> Option<Fallback> {
        match self.session() {
            Some(s) if !s.is_alive() => Some(Fallback::SessionClosed),
            Some(_) => None,
            None => *lock(&self.state.fallback),
        }
    }

    /// The pool request payloads are written into (`None` when shared memory is switched off).
    pub fn pool(&self) -> Option<&Pool> {
        self.state.params.as_ref().map(|p| &p.pool)
    }

    /// A buffer to write a request payload into and send without a copy ([`crate::Loan::freeze`] it into a
    /// `bytes` field). Shared memory when this channel has a session (and the pool has budget), ordinary memory
    /// otherwise, so the same code works with any server.
    pub fn loan(&self, len: usize) -> crate::Loan {
        match self.session() {
            Some(s) => s.loan(len),
            None => crate::Loan::heap(len),
        }
    }

    /// The session's secret id, when a session exists. For protocol tests and debugging tools: anyone who knows it
    /// can send references into this session, so never log it.
    #[doc(hidden)]
    pub fn session_id(&self) -> Option<[u8; 16]> {
        self.session().map(|s| s.id())
    }

    /// The underlying tonic channel.
    pub fn channel(&self) -> &Channel {
        &self.inner
    }

    /// Starts a background attempt to open a new session, if the last one ended and none was tried lately.
    fn maybe_reopen(&self) {
        let Some(params) = self.state.params.clone() else { return };
        if matches!(*lock(&self.state.fallback), Some(Fallback::PeerLacksShmgrpc)) {
            return; // a plain server: nothing to reopen
        }
        {
            let mut retry = lock(&self.state.retry);
            if retry.1 || retry.0.is_some_and(|t| t.elapsed() < RETRY_INTERVAL) {
                return;
            }
            *retry = (Some(Instant::now()), true);
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            lock(&self.state.retry).1 = false;
            return;
        };
        let (channel, state) = (self.inner.clone(), self.state.clone());
        rt.spawn(async move {
            let result = establish(&channel, params, state.version, state.unix.as_deref()).await;
            if result.is_ok() {
                tracing::info!("shmgrpc: session reopened");
            }
            state.settle(result);
            lock(&state.retry).1 = false;
        });
    }
}

impl State {
    /// Records the outcome of an attempt to open a session.
    fn settle(&self, result: Result<Arc<Session>, Fallback>) {
        match result {
            Ok(session) => {
                *write(&self.session) = Some(Arc::new(SessionGuard(session)));
                *lock(&self.fallback) = None;
            }
            Err(reason) => {
                tracing::info!(%reason, "shmgrpc: no shared memory with this server; messages go inline");
                *write(&self.session) = None;
                *lock(&self.fallback) = Some(reason);
            }
        }
    }
}

impl tower_service::Service<http::Request<Body>> for ShmChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let session = self.session();
        if self.state.params.is_some() && !session.as_ref().is_some_and(|s| s.is_alive()) {
            self.maybe_reopen();
        }
        let recorder = self.state.recorder.clone();
        let mut numbered = None;
        let req = match &session {
            Some(s) if s.is_alive() => {
                let call = s.new_call();
                let mut req = req.map(|b| Body::new(SessionBody::new(b, s.0.clone(), call)));
                let (session_header, call_header) = s.call_headers(call);
                req.headers_mut().insert(SESSION_HEADER, session_header);
                if let Some(value) = call_header {
                    req.headers_mut().insert(CALL_HEADER, value);
                }
                numbered = call.map(|call| (s.0.clone(), call));
                req
            }
            _ => {
                let fallback = if self.state.params.is_some() { self.fallback() } else { None };
                req.map(|b| {
                    Body::new(SessionBody::without_session(b, recorder.clone(), self.state.threshold, fallback))
                })
            }
        };
        // References in the response may overtake their segments' registrations: held back until in. Responses
        // of calls without a session go through the same wrapper, which counts their messages for this channel.
        ResponseFuture { inner: self.inner.call(req), recorder, call: numbered }
    }
}

/// The response future of [`ShmChannel`]: tonic's, with the response body wrapped to hold back references whose
/// registration has not arrived yet.
#[derive(Debug)]
pub struct ResponseFuture {
    inner: tonic::transport::channel::ResponseFuture,
    recorder: Arc<Recorder>,
    /// The call's session and number, in a session that numbers calls.
    call: Option<(Arc<Session>, u64)>,
}

impl std::future::Future for ResponseFuture {
    type Output = Result<http::Response<Body>, tonic::transport::Error>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = std::pin::Pin::new(&mut self.inner).poll(cx);
        let (recorder, call) = match &polled {
            Poll::Ready(_) => (self.recorder.clone(), self.call.take()),
            Poll::Pending => return Poll::Pending,
        };
        polled.map_ok(|resp| resp.map(|b| Body::new(HoldBack::new(b, Side::Client, recorder, call))))
    }
}

impl Drop for ResponseFuture {
    /// A call dropped before its response arrived (cancelled, timed out): whatever the server already sent of its
    /// response is discarded with the stream, so the server is told that none of it was read (`CallEnd`).
    fn drop(&mut self) {
        if let Some((session, call)) = self.call.take() {
            session.end_call(call, 0);
        }
    }
}

/// Ends the session when the last clone of the channel is dropped (its buffers return, its peer's mappings go).
#[derive(Debug)]
struct SessionGuard(Arc<Session>);

impl std::ops::Deref for SessionGuard {
    type Target = Arc<Session>;
    fn deref(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Where to look for the side channel the server advertised (`advertised`, a path in the server's mount namespace,
/// or `@name`): when we reached the server through the Unix socket `unix`, first the same file name beside that
/// socket (a server that keeps its side channel beside its gRPC socket, [`ServerConfig::side_channel_beside`],
/// is then found through a directory shared under any path), then the advertised path. The ticket and the
/// challenge make a wrong candidate harmless: only the server that answered `Hello` accepts its ticket.
///
/// [`ServerConfig::side_channel_beside`]: crate::ServerConfig::side_channel_beside
fn side_channel_candidates(advertised: PathBuf, unix: Option<&Path>) -> Vec<PathBuf> {
    let beside = match (unix.and_then(|u| std::path::absolute(u).ok()), advertised.file_name()) {
        (Some(sock), Some(name)) if crate::side_channel::abstract_name(&advertised).is_none() => {
            sock.parent().map(|dir| dir.join(name)).filter(|p| *p != advertised && p.exists())
        }
        _ => None,
    };
    beside.into_iter().chain([advertised]).collect()
}

/// Discovery over gRPC, then the side-channel handshake on the I/O runtime.
async fn establish(
    channel: &Channel,
    params: SessionParams,
    version: u32,
    unix: Option<&Path>,
) -> Result<Arc<Session>, Fallback> {
    if !handshake::supported(version) {
        return Err(Fallback::UnsupportedVersion);
    }
    let mut client = SessionClient::new(channel.clone());
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, client.hello(HelloRequest { version }))
        .await
        .map_err(|_| Fallback::DiscoveryFailed)?
        .map_err(|status| {
            tracing::debug!(%status, "shmgrpc discovery failed");
            discovery_fallback(status.code())
        })?
        .into_inner();
    join_offer(hello, params, version, unix).await
}

/// Why a failed discovery call (`Hello` answered with `code`) leaves a channel inline.
pub(crate) fn discovery_fallback(code: tonic::Code) -> Fallback {
    match code {
        tonic::Code::Unimplemented => Fallback::PeerLacksShmgrpc,
        tonic::Code::FailedPrecondition => Fallback::UnsupportedVersion,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
            // The most common cause, worth saying once at `info`: discovery carries none of the application's
            // metadata, so a whole-server auth layer in front of shmgrpc's refuses it.
            tracing::info!(
                ?code,
                "shmgrpc discovery was refused, likely by an auth layer in front of the server's \
                 `ShmServer::layer()`: add shmgrpc's layer first (`Server::builder().layer(shm.layer())` \
                 before the auth layer); messages go inline"
            );
            Fallback::DiscoveryFailed
        }
        _ => Fallback::DiscoveryFailed,
    }
}

/// The session the server offered in `hello`: the side-channel handshake on the I/O runtime, then the session's
/// tasks. `version` is the highest version we asked for.
pub(crate) async fn join_offer(
    hello: crate::proto::v1::HelloResponse,
    params: SessionParams,
    version: u32,
    unix: Option<&Path>,
) -> Result<Arc<Session>, Fallback> {
    if !handshake::supported(hello.version) || hello.version > version {
        return Err(Fallback::UnsupportedVersion);
    }
    let candidates = side_channel_candidates(PathBuf::from(hello.side_channel), unix);
    let version = hello.version;
    let joined = crate::io::spawn(handshake::join(candidates, hello.ticket, version))
        .map_err(|_| Fallback::HandshakeFailed)?
        .await
        .map_err(|_| Fallback::HandshakeFailed)??;
    Session::start(joined.id, Side::Client, params, joined.link).map_err(|e| {
        tracing::debug!(error = %e, "shmgrpc session tasks could not start");
        Fallback::HandshakeFailed
    })
}
