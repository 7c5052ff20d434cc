//! A raw shmgrpc peer: gRPC calls with the message bytes as given, and a side channel spoken frame by frame.
//!
//! Nothing here is the library's session code: the cases must see exactly what goes over the wire, and be free to
//! break every rule. Side-channel sockets are blocking; every read and write on them runs on tokio's blocking pool,
//! never on a runtime worker.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use shmgrpc::proto::v1::{self, HelloRequest, HelloResponse};
use shmgrpc::protocol::{HELLO_PATH, PROTOCOL_VERSION, SESSION_HEADER};
use shmgrpc::wire::{self, Kind};
use shmgrpc::{PeerSegment, SegmentHandle};

/// How long a case waits for an answer that must come (the protocol's own waits are shorter).
pub const ANSWER: Duration = Duration::from_secs(10);

/// Runs blocking socket work on tokio's blocking pool.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("a blocking task panicked")
}

/// The server under test: its gRPC target (`unix:/path` or `host:port`).
#[derive(Debug, Clone)]
pub struct Target {
    grpc: String,
    channel: tonic::transport::Channel,
}

impl Target {
    /// Connects to `grpc` (`unix:/path`, `http://host:port` or `host:port`).
    ///
    /// # Errors
    ///
    /// The target does not parse, or the connection fails.
    pub async fn connect(grpc: &str) -> Result<Target, String> {
        let endpoint = |uri: String| {
            tonic::transport::Endpoint::from_shared(uri)
                .map(|e| e.initial_stream_window_size(8 << 20).initial_connection_window_size(16 << 20))
                .map_err(|e| e.to_string())
        };
        let channel = match grpc.strip_prefix("unix:") {
            Some(path) => {
                let path = PathBuf::from(path);
                endpoint("http://localhost".into())?
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let path = path.clone();
                        async move {
                            let s = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                        }
                    }))
                    .await
            }
            None if grpc.starts_with("http") => endpoint(grpc.to_string())?.connect().await,
            None => endpoint(format!("http://{grpc}"))?.connect().await,
        }
        .map_err(|e| format!("connecting to {grpc}: {e}"))?;
        Ok(Target { grpc: grpc.to_string(), channel })
    }

    /// A unary call of `method` with `body` as the request's bytes and, with `session`, the session header.
    ///
    /// # Errors
    ///
    /// The call's status.
    pub async fn call(&self, method: &str, body: Bytes, session: Option<&[u8]>) -> Result<Bytes, tonic::Status> {
        self.call_with(method, body, session, &[]).await
    }

    /// [`Target::call`] with more request headers.
    ///
    /// # Errors
    ///
    /// The call's status.
    pub async fn call_with(
        &self,
        method: &str,
        body: Bytes,
        session: Option<&[u8]>,
        headers: &[(&'static str, &str)],
    ) -> Result<Bytes, tonic::Status> {
        let mut g = tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(usize::MAX);
        g.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(body);
        req.set_timeout(ANSWER);
        if let Some(id) = session {
            let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
            req.metadata_mut().insert(SESSION_HEADER, hex.parse().expect("hex"));
        }
        for (name, value) in headers {
            let value = value.parse().map_err(|_| tonic::Status::internal("a header value that is no ASCII"))?;
            req.metadata_mut().insert(*name, value);
        }
        let path: http::uri::PathAndQuery = method.parse().map_err(|_| tonic::Status::internal("bad method"))?;
        Ok(g.unary(req, path, Raw).await?.into_inner())
    }

    /// Discovery (§2) asking for `version`.
    ///
    /// # Errors
    ///
    /// The call's status, or `INTERNAL` for an answer that is no `HelloResponse`.
    pub async fn hello(&self, version: u32) -> Result<HelloResponse, tonic::Status> {
        let body = HelloRequest { version }.encode_to_vec();
        let answer = self.call(HELLO_PATH, body.into(), None).await?;
        HelloResponse::decode(answer).map_err(|e| tonic::Status::internal(format!("not a HelloResponse: {e}")))
    }

    /// Where the side channel `advertised` is: beside our Unix socket first (as shmgrpc's clients look), then the
    /// advertised path.
    fn side_candidates(&self, advertised: &str) -> Vec<PathBuf> {
        let advertised = PathBuf::from(advertised);
        let mut out = Vec::new();
        if let (Some(sock), Some(name)) = (self.grpc.strip_prefix("unix:"), advertised.file_name())
            && !advertised.to_string_lossy().starts_with('@')
            && let Some(dir) = Path::new(sock).parent()
        {
            let beside = dir.join(name);
            if beside != advertised && beside.exists() {
                out.push(beside);
            }
        }
        out.push(advertised);
        out
    }

    /// A fresh side-channel connection, and the discovery answer it is for.
    ///
    /// # Errors
    ///
    /// Discovery failed, or no candidate accepts a connection.
    pub async fn side(&self) -> Result<(Side, HelloResponse), String> {
        let hello = self.hello(PROTOCOL_VERSION).await.map_err(|s| format!("discovery: {s}"))?;
        let candidates = self.side_candidates(&hello.side_channel);
        let sock = blocking(move || {
            let mut last = None;
            for path in candidates {
                match connect(&path) {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(format!("{}: {e}", path.display())),
                }
            }
            Err(last.unwrap_or_default())
        })
        .await?;
        sock.set_read_timeout(Some(ANSWER)).map_err(|e| e.to_string())?;
        Ok((Side(Arc::new(sock)), hello))
    }

    /// A session, by a complete and correct handshake (§4), with its frames served by a reader thread.
    ///
    /// # Errors
    ///
    /// Any step of the handshake failed.
    pub async fn session(&self) -> Result<Session, String> {
        let (side, hello) = self.side().await?;
        side.send(Kind::Attach(v1::Attach { version: hello.version, ticket: hello.ticket })).await?;
        let (m, mut fds) = side.next().await?.ok_or("closed before the challenge")?;
        let Some(Kind::Challenge(ch)) = m.kind else { return Err(format!("expected a challenge, got {m:?}")) };
        let fd = fds.pop().ok_or("a challenge without a descriptor")?;
        let seg = PeerSegment::open(SegmentHandle::Memfd(fd), ch.len).map_err(|e| format!("challenge: {e}"))?;
        let answer = seg.range(0, ch.len).map_err(|e| e.to_string())?.to_vec();
        side.send(Kind::Proof(v1::Proof { answer: answer.into() })).await?;
        let (m, _) = side.next().await?.ok_or("closed before the welcome")?;
        let Some(Kind::Welcome(w)) = m.kind else { return Err(format!("expected welcome, got {m:?}")) };
        let id: [u8; 16] = w.session.as_ref().try_into().map_err(|_| "a session id of another length than 16")?;
        Ok(Session::start(side, id, hello.version))
    }
}

/// Connects to a side channel: a path, or `@name` (abstract).
fn connect(path: &Path) -> std::io::Result<UnixStream> {
    let s = path.to_string_lossy();
    if let Some(name) = s.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        return UnixStream::connect_addr(&addr);
    }
    UnixStream::connect(path)
}

/// A side-channel connection, spoken frame by frame.
#[derive(Debug, Clone)]
pub struct Side(pub Arc<UnixStream>);

impl Side {
    /// Sends one frame.
    ///
    /// # Errors
    ///
    /// The write failed.
    pub async fn send(&self, kind: Kind) -> Result<(), String> {
        self.send_with(kind, None).await
    }

    /// Sends one frame with a descriptor.
    ///
    /// # Errors
    ///
    /// The write failed.
    pub async fn send_with(&self, kind: Kind, fd: Option<OwnedFd>) -> Result<(), String> {
        let s = self.0.clone();
        blocking(move || wire::write_frame(&s, &wire::frame(kind), fd.as_ref().map(|f| f.as_fd())))
            .await
            .map_err(|e| format!("write: {e}"))
    }

    /// Writes raw bytes.
    ///
    /// # Errors
    ///
    /// The write failed.
    pub async fn send_raw(&self, bytes: Vec<u8>) -> Result<(), String> {
        let s = self.0.clone();
        blocking(move || (&*s).write_all(&bytes)).await.map_err(|e| format!("write: {e}"))
    }

    /// The next frame, with its descriptors; `None` when the peer closed the connection.
    ///
    /// # Errors
    ///
    /// The read failed or timed out.
    pub async fn next(&self) -> Result<Option<(v1::SideMessage, Vec<OwnedFd>)>, String> {
        let s = self.0.clone();
        blocking(move || wire::read_frame(&s)).await.map_err(|e| format!("read: {e}"))
    }

    /// Reads until the peer closes the connection; the reason of a `Refused` it sent first, if any.
    ///
    /// # Errors
    ///
    /// The connection stayed open (no end within [`ANSWER`]).
    pub async fn closed(&self) -> Result<Option<String>, String> {
        let s = self.0.clone();
        blocking(move || {
            let mut reason = None;
            loop {
                match wire::read_frame(&s) {
                    Ok(Some((m, _))) => {
                        if let Some(Kind::Refused(r)) = m.kind {
                            reason = Some(r.reason);
                        }
                    }
                    Ok(None) => return Ok(reason),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        return Err("the peer left the connection open".to_string());
                    }
                    Err(_) => return Ok(reason),
                }
            }
        })
        .await
    }
}

/// What the reader thread of a [`Session`] has seen.
#[derive(Debug, Default)]
pub struct Seen {
    /// Answers to our registrations, by segment id, in order (empty: accepted).
    pub registered: HashMap<u32, Vec<String>>,
    /// The peer's segments we mapped, by id.
    pub segments: HashMap<u32, Arc<PeerSegment>>,
    /// Registrations of the peer's that we refused, with the reason.
    pub refused: Vec<(u32, String)>,
    /// `Release` frames received, as (segment, generation).
    pub releases: Vec<(u32, u32)>,
    /// `Returned` frames received, as (segment, generation).
    pub returned: Vec<(u32, u32)>,
    /// `Forget` frames received.
    pub forgotten: Vec<u32>,
    /// `CallEnd` frames received, as (call, received).
    pub call_ends: Vec<(u64, u64)>,
    /// Frames of a kind an established session does not carry.
    pub unexpected: Vec<String>,
    /// The connection ended (and the reason of a `Refused`, if the peer sent one).
    pub closed: Option<Option<String>>,
}

/// An established session: the side channel (served by a reader thread that maps the peer's registrations,
/// answers them, and records every other frame) and the session id.
#[derive(Debug, Clone)]
pub struct Session {
    /// The side channel.
    pub side: Side,
    /// The session id (16 bytes).
    pub id: [u8; 16],
    /// The protocol version agreed on.
    pub version: u32,
    seen: Arc<(Mutex<Seen>, Condvar)>,
}

impl Session {
    fn start(side: Side, id: [u8; 16], version: u32) -> Session {
        let seen: Arc<(Mutex<Seen>, Condvar)> = Arc::default();
        let (s, state) = (side.0.clone(), seen.clone());
        let _ = s.set_read_timeout(None);
        std::thread::Builder::new()
            .name("conformance-side".into())
            .spawn(move || read_loop(&s, &state))
            .expect("a thread");
        Session { side, id, version, seen }
    }

    /// Waits (at most [`ANSWER`]) until `done` holds for what was seen; returns its value then.
    ///
    /// # Errors
    ///
    /// It did not hold in time.
    pub async fn wait<T: Send + 'static>(
        &self,
        what: &'static str,
        done: impl Fn(&Seen) -> Option<T> + Send + 'static,
    ) -> Result<T, String> {
        let seen = self.seen.clone();
        blocking(move || {
            let (lock, cv) = &*seen;
            let deadline = Instant::now() + ANSWER;
            let mut g = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            loop {
                if let Some(t) = done(&g) {
                    return Ok(t);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!("no {what} within {ANSWER:?}"));
                }
                g = cv.wait_timeout(g, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
            }
        })
        .await
    }

    /// What was seen so far (a snapshot of one field, by `f`).
    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Registers segment `segment` (`len` bytes) with `source` and `fd`, and returns the peer's answer (empty:
    /// accepted).
    ///
    /// # Errors
    ///
    /// The frame could not be written, or no answer came.
    pub async fn register(
        &self,
        segment: u32,
        len: u64,
        source: Option<v1::register::Source>,
        fd: Option<OwnedFd>,
    ) -> Result<String, String> {
        let before = self.seen(|s| s.registered.get(&segment).map_or(0, Vec::len));
        self.side.send_with(Kind::Register(v1::Register { segment, len, source }), fd).await?;
        self.wait("Registered", move |s| s.registered.get(&segment).filter(|a| a.len() > before)?.last().cloned()).await
    }

    /// Waits for the end of the connection; the reason of a `Refused` the peer sent first, if any.
    ///
    /// # Errors
    ///
    /// The connection stayed open.
    pub async fn closed(&self) -> Result<Option<String>, String> {
        self.wait("end of the session", |s| s.closed.clone()).await
    }
}

fn read_loop(s: &UnixStream, seen: &(Mutex<Seen>, Condvar)) {
    let (lock, cv) = seen;
    let end = loop {
        let (m, mut fds) = match wire::read_frame(s) {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => break None,
        };
        let mut g = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match m.kind {
            Some(Kind::Registered(r)) => g.registered.entry(r.segment).or_default().push(r.error),
            Some(Kind::Register(r)) => {
                let answer = match (fds.pop(), r.source) {
                    (Some(fd), None) => match PeerSegment::open(SegmentHandle::Memfd(fd), r.len) {
                        Ok(seg) => {
                            g.segments.insert(r.segment, Arc::new(seg));
                            String::new()
                        }
                        Err(e) => e.to_string(),
                    },
                    _ => "this peer maps memfds only".to_string(),
                };
                if !answer.is_empty() {
                    g.refused.push((r.segment, answer.clone()));
                }
                let frame = wire::frame(Kind::Registered(v1::Registered { segment: r.segment, error: answer }));
                if wire::write_frame(s, &frame, None).is_err() {
                    break None;
                }
            }
            Some(Kind::Release(r)) => g.releases.push((r.segment, r.generation)),
            Some(Kind::Returned(r)) => g.returned.push((r.segment, r.generation)),
            Some(Kind::Forget(f)) => {
                g.segments.remove(&f.segment);
                g.forgotten.push(f.segment);
            }
            Some(Kind::CallEnd(c)) => g.call_ends.push((c.call, c.received)),
            Some(Kind::Refused(r)) => break Some(r.reason),
            other => g.unexpected.push(format!("{other:?}")),
        }
        drop(g);
        cv.notify_all();
    };
    lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner).closed = Some(end);
    cv.notify_all();
}

/// A sealed memfd (shrink and grow sealed) of `len` bytes holding `data` at its start.
///
/// # Errors
///
/// The memfd could not be made.
pub fn sealed_memfd(len: u64, data: &[u8]) -> Result<OwnedFd, String> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = memfd(len, data)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).map_err(|e| e.to_string())?;
    let _ = MemfdFlags::ALLOW_SEALING;
    Ok(fd)
}

/// A memfd (sealable, not sealed) of `len` bytes holding `data` at its start.
///
/// # Errors
///
/// The memfd could not be made.
pub fn memfd(len: u64, data: &[u8]) -> Result<OwnedFd, String> {
    use rustix::fs::MemfdFlags;
    let fd = rustix::fs::memfd_create("shmgrpc-conformance", MemfdFlags::ALLOW_SEALING | MemfdFlags::CLOEXEC)
        .map_err(|e| e.to_string())?;
    rustix::fs::ftruncate(&fd, len).map_err(|e| e.to_string())?;
    let mut written = 0;
    while written < data.len() {
        written += rustix::io::pwrite(&fd, &data[written..], written as u64).map_err(|e| e.to_string())?;
    }
    Ok(fd)
}

/// The tonic codec of raw message bytes.
#[derive(Debug, Clone, Copy)]
pub struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n)))
    }
}
