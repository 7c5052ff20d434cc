//! A scripted shmgrpc server, for checking clients: it answers discovery, the handshake and `Echo` the way a case's
//! [`Script`] says (well or badly), and records what the client does ([`Seen`]).
//!
//! The client under test is a command the runner starts once per case, with `{target}` replaced by the fake
//! server's address: it must call `shmgrpc.demo.v1.Blob/Echo` twice on one channel, each with a `Payload` of 1 MiB
//! whose `crc32` is that of its `data`, check that each reply equals its request, and exit 0 if they did
//! (`shmgrpc call --target {target} --size 1MiB --repeat 2` does).

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use prost::Message;
use shmgrpc::proto::v1::{self, part};
use shmgrpc::protocol::{CALL_HEADER, HELLO_PATH, SESSION_HEADER};
use shmgrpc::wire::{self, Kind};
use shmgrpc::{PeerSegment, SegmentHandle};

use crate::peer::{Raw, memfd, sealed_memfd};

/// How the fake server answers `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloMode {
    /// As a plain gRPC server: `UNIMPLEMENTED`.
    Unimplemented,
    /// With this version (and a good ticket and side channel).
    Version(u32),
}

/// How the fake server runs the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeMode {
    /// Correctly.
    Good,
    /// `Refused` after `Attach`.
    Refuse,
    /// A challenge of this many bytes (more than a client accepts when above 4 096).
    ChallengeLen(u64),
    /// A challenge memfd without the shrink and grow seals.
    Unsealed,
}

/// How the fake server treats the client's registrations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterMode {
    /// Maps each and answers `Registered` without an error.
    Accept,
    /// Answers each with an error.
    Refuse,
}

/// How the fake server answers `Echo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// The payload inline.
    Inline,
    /// A reference to a segment of the server's own (registered first): the client must release it.
    Sender,
    /// A reference that sends the client's own region back (a `receiver` part): the client must answer
    /// `Returned`.
    Receiver,
    /// As `Sender`, but the reference leaves before its segment's registration, which follows 300 ms later (a
    /// sender that does not wait for `Registered`): the client must hold the reply back until it is in.
    SenderAhead,
}

/// What a case's fake server does.
#[derive(Debug, Clone, Copy)]
pub struct Script {
    /// Discovery.
    pub hello: HelloMode,
    /// The handshake.
    pub handshake: HandshakeMode,
    /// The client's registrations.
    pub register: RegisterMode,
    /// The reply.
    pub reply: ReplyMode,
    /// The ticket's length.
    pub ticket_len: usize,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            hello: HelloMode::Version(shmgrpc::protocol::PROTOCOL_VERSION),
            handshake: HandshakeMode::Good,
            register: RegisterMode::Accept,
            reply: ReplyMode::Inline,
            ticket_len: 40,
        }
    }
}

/// What the client did, as the fake server saw it.
#[derive(Debug, Default)]
pub struct Seen {
    /// The ticket the server issued, and the one the client presented.
    pub ticket: Vec<u8>,
    /// The ticket in the client's `Attach`.
    pub attached: Option<Vec<u8>>,
    /// Side-channel connections.
    pub connections: usize,
    /// Whether the client sent a `Proof`.
    pub proof: bool,
    /// The session id of the session the server welcomed.
    pub session: Option<[u8; 16]>,
    /// Echo requests: whether each was a reference, and its `shmgrpc-session` and `shmgrpc-call` headers.
    pub requests: Vec<(bool, Option<String>, Option<String>)>,
    /// Problems with a request the client sent (a reference not canonically encoded, one that does not resolve).
    pub faults: Vec<String>,
    /// The client's registrations (segment ids).
    pub registrations: Vec<u32>,
    /// `Release` frames from the client.
    pub releases: Vec<(u32, u32)>,
    /// `Returned` frames from the client.
    pub returned: Vec<(u32, u32)>,
    /// The client's answers to our registrations (empty: accepted).
    pub answers: HashMap<u32, String>,
}

struct State {
    script: Script,
    side_path: PathBuf,
    seen: Mutex<Seen>,
    changed: Condvar,
    /// The session's socket, once welcomed (to send our registrations).
    socket: Mutex<Option<Arc<UnixStream>>>,
    /// The client's segments, mapped.
    segments: Mutex<HashMap<u32, PeerSegment>>,
}

impl State {
    fn note(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        self.changed.notify_all();
    }
}

/// A running fake server: its address, and what it saw. Stops when dropped.
pub struct Fake {
    /// The gRPC target (`unix:/path`).
    pub target: String,
    state: Arc<State>,
    _dir: TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fake").field("target", &self.target).finish_non_exhaustive()
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Fake {
    /// Starts a fake server following `script`.
    ///
    /// # Errors
    ///
    /// Its sockets could not be made.
    pub async fn start(script: Script) -> Result<Fake, String> {
        let mut r = [0u8; 8];
        getrandom(&mut r);
        let dir = std::env::temp_dir().join(format!(
            "shmgrpc-conformance-{}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(r)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let dir = TempDir(dir);
        let grpc_path = dir.0.join("grpc.sock");
        let side_path = dir.0.join("side.sock");
        let mut ticket = vec![0u8; script.ticket_len];
        getrandom(&mut ticket);
        let state = Arc::new(State {
            script,
            side_path: side_path.clone(),
            seen: Mutex::new(Seen { ticket, ..Seen::default() }),
            changed: Condvar::new(),
            socket: Mutex::new(None),
            segments: Mutex::default(),
        });
        let side = UnixListener::bind(&side_path).map_err(|e| e.to_string())?;
        let st = state.clone();
        std::thread::Builder::new()
            .name("fake-side".into())
            .spawn(move || {
                for conn in side.incoming() {
                    let Ok(conn) = conn else { break };
                    let st = st.clone();
                    std::thread::spawn(move || side_channel(&st, conn));
                }
            })
            .map_err(|e| e.to_string())?;
        let listener = tokio::net::UnixListener::bind(&grpc_path).map_err(|e| e.to_string())?;
        let incoming = futures_util::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| s);
            Some((conn, l))
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(HelloService(state.clone()))
            .add_service(BlobService(state.clone()));
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        Ok(Fake { target: format!("unix:{}", grpc_path.display()), state, _dir: dir, stop: Some(stop) })
    }

    /// What the client did so far (through `f`).
    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.state.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Waits (at most `limit`) until `done` holds for what was seen.
    pub fn wait_for(&self, limit: Duration, done: impl Fn(&Seen) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.state.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if done(&g) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.state.changed.wait_timeout(g, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(s) = self.state.socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn getrandom(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the system's random source");
}

/// The side channel of one connection: the handshake as scripted, then the session's frames.
fn side_channel(st: &State, s: UnixStream) {
    st.note(|seen| seen.connections += 1);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let s = Arc::new(s);
    let Ok(Some((m, _))) = wire::read_frame(&s) else { return };
    let Some(Kind::Attach(a)) = m.kind else { return };
    st.note(|seen| seen.attached = Some(a.ticket.to_vec()));
    let script = st.script;
    if script.handshake == HandshakeMode::Refuse {
        let _ = wire::write_frame(&s, &wire::frame(Kind::Refused(v1::Refused { reason: "scripted".into() })), None);
        return;
    }
    let len = match script.handshake {
        HandshakeMode::ChallengeLen(n) => n,
        _ => 32,
    };
    let answer: Vec<u8> = (0..len.min(1 << 20)).map(|i| (i * 7 + 3) as u8).collect();
    let fd = match script.handshake {
        HandshakeMode::Unsealed => memfd(len.max(1), &answer),
        _ => sealed_memfd(len.max(1), &answer),
    };
    let Ok(fd) = fd else { return };
    if wire::write_frame(&s, &wire::frame(Kind::Challenge(v1::Challenge { len })), Some(fd.as_fd())).is_err() {
        return;
    }
    let Ok(Some((m, _))) = wire::read_frame(&s) else { return };
    let Some(Kind::Proof(p)) = m.kind else { return };
    st.note(|seen| seen.proof = true);
    if p.answer.as_ref() != answer.as_slice() {
        return;
    }
    let id: [u8; 16] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(len as u8));
    if wire::write_frame(
        &s,
        &wire::frame(Kind::Welcome(v1::Welcome { session: id.to_vec().into(), threshold: 0 })),
        None,
    )
    .is_err()
    {
        return;
    }
    st.note(|seen| seen.session = Some(id));
    *st.socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(s.clone());
    let _ = s.set_read_timeout(None);
    while let Ok(Some((m, mut fds))) = wire::read_frame(&s) {
        match m.kind {
            Some(Kind::Register(r)) => {
                st.note(|seen| seen.registrations.push(r.segment));
                let error = match (script.register, fds.pop()) {
                    (RegisterMode::Refuse, _) => "scripted refusal".to_string(),
                    (RegisterMode::Accept, Some(fd)) => match PeerSegment::open(SegmentHandle::Memfd(fd), r.len) {
                        Ok(seg) => {
                            st.segments
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .insert(r.segment, seg);
                            String::new()
                        }
                        Err(e) => e.to_string(),
                    },
                    (RegisterMode::Accept, None) => "this fake server maps memfds only".to_string(),
                };
                let ack = Kind::Registered(v1::Registered { segment: r.segment, error });
                if wire::write_frame(&s, &wire::frame(ack), None).is_err() {
                    break;
                }
            }
            Some(Kind::Registered(r)) => st.note(|seen| {
                seen.answers.insert(r.segment, r.error);
            }),
            Some(Kind::Release(r)) => st.note(|seen| seen.releases.push((r.segment, r.generation))),
            Some(Kind::Returned(r)) => st.note(|seen| seen.returned.push((r.segment, r.generation))),
            _ => {}
        }
    }
}

/// `shmgrpc.v1.Session` (discovery) as scripted.
#[derive(Clone)]
struct HelloService(Arc<State>);

impl tonic::server::NamedService for HelloService {
    const NAME: &'static str = "shmgrpc.v1.Session";
}

/// `shmgrpc.demo.v1.Blob` (Echo only) as scripted.
#[derive(Clone)]
struct BlobService(Arc<State>);

impl tonic::server::NamedService for BlobService {
    const NAME: &'static str = "shmgrpc.demo.v1.Blob";
}

/// The tower service of a scripted gRPC service: the method at `$path` when `$serves` holds, `UNIMPLEMENTED`
/// otherwise, its unary handler `$handler` over raw bytes.
macro_rules! scripted_service {
    ($service:ident, $handler:ident, $path:expr, $serves:expr) => {
        impl tower::Service<http::Request<tonic::body::Body>> for $service {
            type Response = http::Response<tonic::body::Body>;
            type Error = Infallible;
            type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
                let st = self.0.clone();
                Box::pin(async move {
                    let serves: fn(&State) -> bool = $serves;
                    if req.uri().path() != $path || !serves(&st) {
                        return Ok(tonic::Status::unimplemented("scripted").into_http());
                    }
                    Ok(tonic::server::Grpc::new(Raw).unary($handler(st), req).await)
                })
            }
        }
    };
}

scripted_service!(HelloService, Hello, HELLO_PATH, |st| st.script.hello != HelloMode::Unimplemented);
scripted_service!(BlobService, Echo, "/shmgrpc.demo.v1.Blob/Echo", |_| true);

struct Hello(Arc<State>);

impl tonic::server::UnaryService<Bytes> for Hello {
    type Response = Bytes;
    type Future = BoxFuture<'static, Result<tonic::Response<Bytes>, tonic::Status>>;

    fn call(&mut self, _req: tonic::Request<Bytes>) -> Self::Future {
        let st = self.0.clone();
        Box::pin(async move {
            let HelloMode::Version(version) = st.script.hello else { unreachable!("answered above") };
            let ticket = st.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).ticket.clone();
            let answer = v1::HelloResponse {
                version,
                side_channel: st.side_path.to_string_lossy().into_owned(),
                ticket: ticket.into(),
            };
            Ok(tonic::Response::new(answer.encode_to_vec().into()))
        })
    }
}

struct Echo(Arc<State>);

impl tonic::server::UnaryService<Bytes> for Echo {
    type Response = Bytes;
    type Future = BoxFuture<'static, Result<tonic::Response<Bytes>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<Bytes>) -> Self::Future {
        let st = self.0.clone();
        Box::pin(async move {
            let header = |name: &str| req.metadata().get(name).and_then(|v| v.to_str().ok()).map(String::from);
            let (session, call) = (header(SESSION_HEADER), header(CALL_HEADER));
            let body = req.into_inner();
            let is_ref = wire::is_reference(&body);
            st.note(|seen| seen.requests.push((is_ref, session, call)));
            let st2 = st.clone();
            tokio::task::spawn_blocking(move || answer(&st2, body))
                .await
                .map_err(|e| tonic::Status::internal(e.to_string()))?
                .map(tonic::Response::new)
                .map_err(|e| {
                    st.note(|seen| seen.faults.push(e.clone()));
                    tonic::Status::invalid_argument(e)
                })
        })
    }
}

/// The reply to an Echo request, as scripted.
fn answer(st: &State, body: Bytes) -> Result<Bytes, String> {
    let (payload, ours) = if wire::is_reference(&body) {
        let r = wire::decode_reference(&body).map_err(|e| format!("a request reference that does not decode: {e}"))?;
        let mut again = Vec::new();
        wire::encode_reference(r.clone(), &mut again);
        if again.len() != body.len() {
            return Err("a request reference not canonically encoded".into());
        }
        let mut out = Vec::new();
        let mut region = None;
        let segments = st.segments.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in &r.parts {
            match &p.kind {
                Some(part::Kind::Inline(b)) => out.extend_from_slice(b),
                Some(part::Kind::Sender(reg)) => {
                    let seg = segments.get(&reg.segment).ok_or("a reference to a segment never registered")?;
                    out.extend_from_slice(seg.range(reg.offset, reg.len).map_err(|e| e.to_string())?);
                    region = Some(*reg);
                }
                _ => return Err("a request part that is neither inline nor the sender's".into()),
            }
        }
        (out, region)
    } else {
        (body.to_vec(), None)
    };
    let sock = st.socket.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let session = st.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).session;
    let reply = match (st.script.reply, sock, session, ours) {
        (mode @ (ReplyMode::Sender | ReplyMode::SenderAhead), Some(sock), Some(id), _) => {
            // A segment of its own for each reply: segment ids are never reused (protocol section 5).
            let segment = st.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).requests.len() as u32;
            let fd: OwnedFd = sealed_memfd((payload.len() as u64).max(4096), &payload)?;
            let len = (payload.len() as u64).max(4096);
            let reg = wire::frame(Kind::Register(v1::Register { segment, len, source: None }));
            if mode == ReplyMode::SenderAhead {
                // The registration follows the reference (a sender that does not wait for `Registered`).
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    // A failed write leaves the reply unresolvable: the client's call fails, and so does the case.
                    let _ = wire::write_frame(&sock, &reg, Some(fd.as_fd()));
                });
            } else {
                wire::write_frame(&sock, &reg, Some(fd.as_fd())).map_err(|e| e.to_string())?;
                // The reference waits for the client's answer, as a sender does (protocol section 5).
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut seen = st.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                while !seen.answers.contains_key(&segment) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err("the client never answered our registration".into());
                    }
                    seen = st.changed.wait_timeout(seen, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
                }
            }
            let part = v1::Part {
                kind: Some(part::Kind::Sender(v1::Region {
                    segment,
                    generation: 5,
                    offset: 0,
                    len: payload.len() as u64,
                })),
            };
            reference(&id, vec![part])
        }
        (ReplyMode::Receiver, Some(_), Some(id), Some(region)) => {
            let part = v1::Part { kind: Some(part::Kind::Receiver(region)) };
            reference(&id, vec![part])
        }
        _ => Bytes::from(payload),
    };
    Ok(reply)
}

fn reference(id: &[u8; 16], parts: Vec<v1::Part>) -> Bytes {
    let mut out = Vec::new();
    wire::encode_reference(v1::Reference { session: Bytes::copy_from_slice(id), from_server: true, parts }, &mut out);
    out.into()
}
