//! The session layer without tonic: what a binding to another gRPC stack needs (the Python package's extension
//! module, `crates/shmgrpc-python`, over grpcio).
//!
//! tonic's integration ([`crate::ShmChannel`], [`crate::ShmServer::layer`], [`crate::ShmCodec`]) hides sessions
//! inside body wrappers. A gRPC stack that cannot be wrapped that way (grpcio calls a serializer and a
//! deserializer with bytes, and nothing else) drives the same sessions through this module instead:
//!
//! - [`ClientCore`]: a client's pool and counters. Its discovery request goes out on the binding's own gRPC
//!   channel ([`ClientCore::hello_request`]), and [`ClientCore::join`] takes the answer and runs the side-channel
//!   handshake: the result is a [`CoreSession`].
//! - [`ServerCore`]: a [`ShmServer`] (the side channel, tickets, sessions) whose discovery answers are given as
//!   bytes ([`ServerCore::answer_hello`]); a call's session is found from its `shmgrpc-session` header
//!   ([`ServerCore::session`]).
//! - Sending: [`CoreSession::send`] encodes an already serialized message (given as slices, so a payload written
//!   into a [`Loan`], or lying in the peer's memory, is referred to in place) and returns what goes on the gRPC
//!   stream: a reference, or the message itself when it must go inline. Waits for a registration's answer and for
//!   the in-flight window are a [`Waiting`] the caller resolves on a thread of its own ([`Waiting::wait`]) or polls
//!   ([`Waiting::poll`]); nothing waits inside `send`.
//! - Receiving: [`ClientCore::receive`] / [`receive_request`] resolve a reference into its parts, which point
//!   into the peer's memory and keep it held until dropped ([`Received`]); [`ClientCore::needs_wait`] tells when a
//!   reference overtook its registration and resolving it would wait (at most 2 s).
//!
//! Everything else (holds, releases, the window, caps, tickets, statistics) is the same code the tonic integration
//! runs: one implementation of the protocol.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tokio::sync::Notify;

use crate::config::{ClientConfig, SessionParams};
use crate::pool::Pool;
use crate::proto::v1::{self, HelloRequest, HelloResponse};
pub use crate::protocol::call_number;
use crate::protocol::{REGISTRATION_WAIT, Side};
use crate::segment::PeerSegment;
use crate::server::ShmServer;
use crate::session::{Loan, Outcome, Resolved, Session, SessionStats};
use crate::stats::{self, Event, Fallback, Recorder, TransferStats};
use crate::wire::{self, Reference};

/// A gRPC status a binding raises: its code (as `tonic::Code`'s numbers, which are gRPC's) and message.
pub type Status = tonic::Status;

/// A message already serialized, given as slices in order (written as they are: a slice lying in one of our loans
/// or in the peer's memory becomes a part of its own, referred to in place).
#[derive(Debug)]
struct Raw<'a>(&'a [&'a [u8]]);

impl Message for Raw<'_> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for s in self.0 {
            buf.put_slice(s);
        }
    }

    /// Never decoded into: fields are skipped.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.iter().map(|s| s.len()).sum()
    }

    fn clear(&mut self) {}
}

/// Counts into one channel's or server's counters (and the process's): for messages a binding sends or receives
/// inline, which never reach a session.
#[derive(Debug, Clone)]
pub struct Counters(Arc<Recorder>);

impl Counters {
    /// One message sent inline, of `len` bytes; `fallback` says why when it was meant for shared memory.
    pub fn inline_sent(&self, len: usize, fallback: Option<Fallback>) {
        if let Some(reason) = fallback {
            self.0.record_both(Event::Fallback(reason));
        }
        self.0.record_both(Event::InlineSent(len));
    }

    /// One message received inline, of `len` bytes.
    pub fn inline_received(&self, len: usize) {
        self.0.record_both(Event::InlineReceived(len));
    }

    /// A message that could not be decoded (a bad reference, bytes that are not the message type).
    pub fn bad_reference(&self) {
        self.0.record_both(Event::BadReference);
    }

    /// The counters so far.
    pub fn snapshot(&self) -> TransferStats {
        self.0.snapshot()
    }
}

/// A client's side of the session layer, for a binding (see the module docs).
#[derive(Debug)]
pub struct ClientCore {
    params: SessionParams,
    version: u32,
}

impl ClientCore {
    /// The pool and counters of one client channel, configured as a [`crate::ShmChannel`] would be
    /// (`shared_memory(false)` is the binding's business: it then never joins).
    ///
    /// # Errors
    ///
    /// The pool configuration is invalid.
    pub fn new(config: ClientConfig) -> crate::Result<ClientCore> {
        let version = config.protocol_version;
        Ok(ClientCore { params: config.send.into_params(Side::Client)?, version })
    }

    /// The encoded `HelloRequest` to send to `/shmgrpc.v1.Session/Hello` ([`crate::protocol::HELLO_PATH`]).
    pub fn hello_request(&self) -> Vec<u8> {
        HelloRequest { version: self.version }.encode_to_vec()
    }

    /// Why a failed discovery call leaves the channel inline, from its status code.
    pub fn discovery_failed(code: tonic::Code) -> Fallback {
        crate::client::discovery_fallback(code)
    }

    /// Joins the session the server offered in `hello` (the encoded `HelloResponse`): connects to its side channel
    /// (first beside `unix`, the server's Unix socket, when the client reached it through one), checks the
    /// server's uid and answers the challenge. Blocks the calling thread for at most the handshake timeout (5 s);
    /// the handshake itself runs on the I/O thread. Must not be called on the I/O thread.
    ///
    /// # Errors
    ///
    /// Why there is no session (the channel goes inline).
    pub fn join(&self, hello: &[u8], unix: Option<&Path>) -> Result<CoreSession, Fallback> {
        let hello = HelloResponse::decode(hello).map_err(|_| Fallback::DiscoveryFailed)?;
        let (params, version, unix) = (self.params.clone(), self.version, unix.map(Path::to_path_buf));
        let session =
            block_on_io(async move { crate::client::join_offer(hello, params, version, unix.as_deref()).await })
                .ok_or(Fallback::HandshakeFailed)??;
        Ok(CoreSession { session: session.clone(), _owner: Some(Arc::new(CloseOnDrop(session))) })
    }

    /// The pool requests are written into.
    pub fn pool(&self) -> &Pool {
        &self.params.pool
    }

    /// This client's counters.
    pub fn counters(&self) -> Counters {
        Counters(self.params.recorder.clone())
    }

    /// Messages from this size up are meant for shared memory.
    pub fn threshold(&self) -> usize {
        self.params.threshold
    }

    /// Resolves a response that is a reference into its parts; a reference that overtook the registration of a segment
    /// it names waits for it with `wait` (blocking the calling thread, at most 2 s: protocol §6; never on the I/O
    /// thread) and fails without; the message is counted.
    ///
    /// # Errors
    ///
    /// The status the protocol gives a bad reference (docs/protocol.md §9).
    pub fn receive(&self, message: &[u8], wait: bool) -> Result<Received, Status> {
        receive(message, Side::Client, wait)
    }

    /// Whether resolving this response would wait for the registration of a segment it names (an asynchronous
    /// binding then resolves it on a worker thread).
    pub fn needs_wait(&self, message: &[u8]) -> bool {
        needs_wait(message, Side::Client)
    }
}

/// A server's side of the session layer, for a binding (see the module docs).
#[derive(Debug)]
pub struct ServerCore {
    server: ShmServer,
}

impl ServerCore {
    /// Binds the side channel and starts accepting sessions, as [`ShmServer::new`].
    ///
    /// # Errors
    ///
    /// As [`ShmServer::new`].
    pub fn new(config: crate::ServerConfig) -> crate::Result<ServerCore> {
        Ok(ServerCore { server: ShmServer::new(config)? })
    }

    /// The server.
    pub fn server(&self) -> &ShmServer {
        &self.server
    }

    /// The encoded `HelloResponse` for the encoded `HelloRequest` `request` (a fresh ticket, the side channel's
    /// path, the version both speak).
    ///
    /// # Errors
    ///
    /// `INVALID_ARGUMENT` for a request that does not decode, `FAILED_PRECONDITION` for a version this server
    /// does not speak.
    pub fn answer_hello(&self, request: &[u8]) -> Result<Vec<u8>, Status> {
        let request = HelloRequest::decode(request)
            .map_err(|e| Status::invalid_argument(format!("HelloRequest does not decode: {e}")))?;
        Ok(self.server.hello_response(request.version)?.encode_to_vec())
    }

    /// The live session a call's `shmgrpc-session` header names, if it is one of this process's server sessions,
    /// and the call's number (protocol §6): `session` is the header's value, `call` the `shmgrpc-call` header's,
    /// which only a version 3 session reads (version 4 carries the number in the session header). `None` for a
    /// number that is missing or not one: the call is served unnumbered.
    pub fn session(&self, session: &str, call: Option<&str>) -> Option<(CoreSession, Option<u64>)> {
        Session::of_call(session, call, Side::Server).map(|(session, n)| (CoreSession { session, _owner: None }, n))
    }

    /// This server's counters.
    pub fn counters(&self) -> Counters {
        Counters(self.server.recorder().clone())
    }
}

/// Whether resolving the request `message` (a reference) would wait for the registration of a segment it names (an
/// asynchronous binding then resolves it on a worker thread).
pub fn request_needs_wait(message: &[u8]) -> bool {
    needs_wait(message, Side::Server)
}

/// Resolves a request that is a reference, on the server side of the session it names (server sessions are
/// found in the process's registry: no server object is needed); a reference that overtook the registration of a
/// segment it names waits for it with `wait` (blocking the calling thread, at most 2 s: protocol §6; never on the I/O
/// thread) and fails without; the message is counted.
///
/// # Errors
///
/// The status the protocol gives a bad reference (docs/protocol.md §9).
pub fn receive_request(message: &[u8], wait: bool) -> Result<Received, Status> {
    receive(message, Side::Server, wait)
}

/// Closes a client's session when the last handle goes.
#[derive(Debug)]
struct CloseOnDrop(Arc<Session>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One end of a session, as a binding holds it. A client's session closes when its last handle is dropped (or on
/// [`CoreSession::close`]); a server's lives as long as its side channel.
#[derive(Debug, Clone)]
pub struct CoreSession {
    session: Arc<Session>,
    _owner: Option<Arc<CloseOnDrop>>,
}

/// What goes on the gRPC stream for one message (see [`CoreSession::send`]).
#[derive(Debug)]
pub enum Sending {
    /// A reference: send these bytes in place of the message.
    Reference(Vec<u8>),
    /// Send the message itself, inline (counted already; `Some` says why it did not go through shared memory).
    Inline(Option<Fallback>),
    /// The message is in shared memory, but must wait for the peer: [`Waiting::wait`] or [`Waiting::poll`].
    Waiting(Waiting),
}

impl CoreSession {
    /// The session id in lowercase hex: the `shmgrpc-session` header value of a call that is not numbered.
    pub fn header(&self) -> &str {
        self.session.header_text()
    }

    /// The values of the headers of a call of this session (protocol §6): the `shmgrpc-session` value, which from
    /// version 4 on carries the call's `number` too, and in version 3 the `shmgrpc-call` value apart.
    pub fn call_headers(&self, number: Option<u64>) -> (String, Option<String>) {
        match number {
            Some(n) if self.session.number_in_session_header() => (self.session.numbered_header(n), None),
            Some(n) => (self.header().to_owned(), Some(n.to_string())),
            None => (self.header().to_owned(), None),
        }
    }

    /// Whether the session is open.
    pub fn is_alive(&self) -> bool {
        self.session.is_alive()
    }

    /// The protocol version agreed on.
    pub fn version(&self) -> u32 {
        self.session.version()
    }

    /// Figures of this session.
    pub fn stats(&self) -> SessionStats {
        self.session.stats()
    }

    /// Ends the session: the peer's holds come back, its mappings go.
    pub fn close(&self) {
        self.session.close();
    }

    /// A buffer to write a payload into and send without a copy (ordinary memory when the pool has no room or
    /// the session is closed).
    pub fn loan(&self, len: usize) -> Loan {
        self.session.loan(len)
    }

    /// Messages from this size up are meant for shared memory.
    pub fn threshold(&self) -> usize {
        self.session.threshold()
    }

    /// The threshold the server named when the session was set up (protocol §4, `Welcome`): the server sends
    /// its messages from this size up through shared memory. `None` in a server's session.
    pub fn peer_threshold(&self) -> Option<usize> {
        self.session.peer_threshold()
    }

    /// The scope of one call in a session that numbers calls (protocol version 3, §6), `None` in one that does
    /// not. A client passes `None` and gets a new number (send it in the call's headers: [`Self::call_headers`]);
    /// a server passes the number the call's headers carry ([`ServerCore::session`]).
    pub fn call(&self, number: Option<u64>) -> Option<CallScope> {
        if !self.session.numbers_calls() {
            return None;
        }
        let number = match number {
            Some(n) => n,
            None => self.session.new_call()?,
        };
        self.session.open_call(number);
        Some(self.scope(number, true))
    }

    /// The scope of a new call of a client (see [`Self::call`]) whose one request is encoded before the call
    /// starts, as grpcio does for unary-unary and unary-stream calls (blocking and asyncio). Its one request is sent before the server can know the call,
    /// so no `CallEnd` can come before it, and the scope stays out of the ledger of open calls (which exists for
    /// messages sent after a `CallEnd`): one lock and map update fewer on each small call. A `CallEnd` after the
    /// request still finds its holds.
    pub fn unary_call(&self) -> Option<CallScope> {
        let number = self.session.new_call()?;
        Some(self.scope(number, false))
    }

    fn scope(&self, number: u64, opened: bool) -> CallScope {
        CallScope {
            session: self.clone(),
            number,
            opened,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        }
    }

    /// Encodes the serialized message `slices` (concatenated) for the peer, if it is at least the threshold long.
    /// Never waits: when the message must wait for the peer (a new segment's registration, a full in-flight
    /// window), the answer is [`Sending::Waiting`]. Counts what it decided.
    pub fn send(&self, slices: &[&[u8]]) -> Sending {
        self.send_tagged(slices, None)
    }

    /// [`CoreSession::send`] for message `message` (call number, index in the call) of a numbered call.
    fn send_tagged(&self, slices: &[&[u8]], message: Option<(u64, u64)>) -> Sending {
        let raw = Raw(slices);
        let len = raw.encoded_len();
        let recorder = self.session.recorder();
        if len < self.session.threshold() {
            recorder.record_both(Event::InlineSent(len));
            return Sending::Inline(None);
        }
        let (held, window) = self.session.window_use();
        match self.session.encode_to_shm(&raw, len, message) {
            Ok((reference, unacknowledged)) => {
                let window_wait = held >= window;
                if unacknowledged.is_empty() && !window_wait {
                    recorder.record_both(Event::ShmSent(len));
                    return Sending::Reference(reference_bytes(reference));
                }
                if window_wait {
                    recorder.record_both(Event::WindowWait);
                }
                let mine = reference
                    .parts
                    .iter()
                    .map(|p| match &p.kind {
                        Some(v1::part::Kind::Sender(r)) => r.len,
                        _ => 0,
                    })
                    .sum();
                let mut limit = Duration::MAX;
                if !unacknowledged.is_empty() {
                    limit = limit.min(REGISTRATION_WAIT);
                }
                if window_wait {
                    limit = limit.min(self.session.window_wait());
                }
                Sending::Waiting(Waiting {
                    gate: Gate { session: self.session.clone(), unacknowledged, window: window_wait, mine },
                    reference: Some(reference),
                    len,
                    deadline: Instant::now() + limit,
                })
            }
            Err(reason) => {
                recorder.record_both(Event::Fallback(reason));
                recorder.record_both(Event::InlineSent(len));
                Sending::Inline(Some(reason))
            }
        }
    }
}

/// One call of a session that numbers calls (protocol version 3): our messages on it are numbered (so that the
/// peer's `CallEnd` gives back the holds of those it never read), the peer's are counted, and when our reading of
/// the peer's stream stops before its end, [`CallScope::end`] tells the peer how many we read (`CallEnd`).
#[derive(Debug)]
pub struct CallScope {
    session: CoreSession,
    number: u64,
    /// Whether the call is in the session's ledger of open calls (closed on drop).
    opened: bool,
    sent: AtomicU64,
    received: AtomicU64,
    complete: AtomicBool,
    ended: AtomicBool,
}

impl CallScope {
    /// The call's number (the `shmgrpc-call` header's value).
    pub fn number(&self) -> u64 {
        self.number
    }

    /// Sends our next message on the call (see [`CoreSession::send`]); every message counts, inline ones too.
    pub fn send(&self, slices: &[&[u8]]) -> Sending {
        let index = self.sent.fetch_add(1, Ordering::Relaxed);
        self.session.send_tagged(slices, Some((self.number, index)))
    }

    /// Messages from this size up are meant for shared memory (the session's threshold).
    pub fn threshold(&self) -> usize {
        self.session.threshold()
    }

    /// One more message of the peer's was read (decoded) on this call.
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// The peer's stream was read to its end: [`CallScope::end`] has nothing to say.
    pub fn complete(&self) {
        self.complete.store(true, Ordering::Release);
    }

    /// The call is over on our side. If we stopped reading the peer's stream before its end, the peer learns how
    /// many of its messages we read (`CallEnd`), and drops the holds of the rest. Once; never blocks.
    pub fn end(&self) {
        if self.ended.swap(true, Ordering::AcqRel) || self.complete.load(Ordering::Acquire) {
            return;
        }
        self.session.session.end_call(self.number, self.received.load(Ordering::Relaxed));
    }
}

impl Drop for CallScope {
    fn drop(&mut self) {
        if self.opened {
            self.session.session.close_call(self.number);
        }
    }
}

/// A message in shared memory that waits for the peer before its reference may leave: for the registration of a
/// segment it names (at most 2 s) and, for a full in-flight window, for releases (at most the window wait). Then
/// it is a reference, or (refused, timed out) the message's own bytes, rebuilt from our buffers, to send inline.
/// Dropping it unresolved takes the message back (nothing stays held).
#[derive(Debug)]
pub struct Waiting {
    gate: Gate,
    reference: Option<Reference>,
    len: usize,
    deadline: Instant,
}

/// What a waiting message waits for.
#[derive(Debug, Clone)]
struct Gate {
    session: Arc<Session>,
    unacknowledged: Vec<u32>,
    window: bool,
    /// Bytes of ours this message itself holds (not counted against its own wait for the window).
    mine: u64,
}

impl Gate {
    fn registration(&self) -> Outcome {
        if self.unacknowledged.is_empty() { Outcome::Acknowledged } else { self.session.outcome(&self.unacknowledged) }
    }

    fn window_open(&self) -> bool {
        let (held, window) = self.session.window_use();
        !self.window || held.saturating_sub(self.mine) < window
    }

    /// Whether the peer has answered everything this message waits for (or refused it, or the session ended).
    fn settled(&self) -> bool {
        !self.session.is_alive()
            || match self.registration() {
                Outcome::Refused => true,
                Outcome::Pending => false,
                Outcome::Acknowledged => self.window_open(),
            }
    }
}

/// What a resolved [`Waiting`] sends.
#[derive(Debug)]
pub enum Resolution {
    /// The reference's bytes.
    Reference(Vec<u8>),
    /// The message's bytes, inline, and why.
    Inline(Vec<u8>, Fallback),
}

impl Waiting {
    /// Without waiting: the resolution once the peer has answered (or the wait ran out), `None` while it waits
    /// (and after the resolution was taken).
    pub fn poll(&mut self) -> Option<Resolution> {
        if self.gate.settled() || Instant::now() >= self.deadline { self.finish() } else { None }
    }

    /// Without waiting: the resolution now. A message whose registration is still unanswered, or whose window is
    /// still full, goes inline (rebuilt from our buffers), as when the wait runs out: for a caller that must not
    /// wait (an event loop), never for one that may.
    pub fn now(mut self) -> Resolution {
        self.finish().expect("resolved once: `now` takes the message")
    }

    /// Blocks the calling thread until the peer has answered or the wait ran out (the wait is bounded: 2 s for a
    /// registration, the window wait for the window). Must not be called on the I/O thread.
    pub fn wait(mut self) -> Resolution {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if !self.gate.settled() && !left.is_zero() {
            let gate = self.gate.clone();
            let notify = gate.session.progress().clone();
            let _ = block_on_io(async move { until(&notify, left, || gate.settled()).await });
        }
        self.finish().expect("resolved once: `wait` takes the message")
    }

    fn finish(&mut self) -> Option<Resolution> {
        let reference = self.reference.take()?;
        let g = &self.gate;
        let s = &g.session;
        let recorder = s.recorder();
        let reason = match g.registration() {
            Outcome::Refused => Fallback::RegistrationFailed,
            Outcome::Pending => {
                s.give_up(&g.unacknowledged);
                Fallback::RegistrationFailed
            }
            Outcome::Acknowledged if g.window_open() => {
                recorder.record_both(Event::ShmSent(self.len));
                return Some(Resolution::Reference(reference_bytes(reference)));
            }
            Outcome::Acknowledged => Fallback::WindowFull,
        };
        Some(match s.take_back(&reference) {
            Some(bytes) => {
                recorder.record_both(Event::Fallback(reason));
                recorder.record_both(Event::InlineSent(self.len));
                Resolution::Inline(bytes, reason)
            }
            // The session closed meanwhile: the holds are gone, the reference fails at the peer as any reference
            // to a closed session does (the caller's call fails, as with a connection lost).
            None => {
                recorder.record_both(Event::ShmSent(self.len));
                Resolution::Reference(reference_bytes(reference))
            }
        })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(r) = self.reference.take() {
            let _ = self.gate.session.take_back(&r);
        }
    }
}

fn reference_bytes(r: Reference) -> Vec<u8> {
    let mut out = Vec::new();
    wire::encode_reference(r, &mut out);
    out
}

/// A resolved reference: the message's parts in order, pointing into the peer's memory (or ours, for a part the
/// peer sent back). The peer's buffers stay held until this is dropped (then the releases go, from the I/O
/// thread; dropping never blocks).
#[derive(Debug)]
pub struct Received {
    parts: Vec<Bytes>,
    segments: Vec<Arc<PeerSegment>>,
}

impl Received {
    /// The parts, in order; the message is their concatenation.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The message's length.
    pub fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
    }

    /// Whether the message is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After reading: `DATA_LOSS` if the peer shrank one of its segments while it was read (what was read past the
    /// new end were zeros, not the message).
    ///
    /// # Errors
    ///
    /// `DATA_LOSS`, as said.
    pub fn check(&self) -> Result<(), Status> {
        if self.segments.iter().any(|s| s.is_poisoned()) {
            return Err(Status::data_loss("the peer shrank a shared segment while the message was read"));
        }
        Ok(())
    }
}

/// What a client has seen of one unary method's message sizes, which says whether its next call needs the
/// session's header (protocol §6: a call without one is plain gRPC).
///
/// The header costs a small call a few percent (grpcio's handling of one more metadata entry, the server's
/// lookup of the session), and a call whose request and response both stay below the threshold gains nothing
/// from a session. So the first [`SizeHint::LEARNING_CALLS`] calls of a method carry the header; after them, a
/// call whose request is below the threshold is sent without it while every message of the method seen so far
/// was below the threshold. The first message at or above it (a request the client is about to send, or a
/// response, which then came inline: the server had no session for it) makes every later call carry the header.
/// The cost of the guess: one large response of a method that had only small ones for its first calls travels
/// inline, once.
///
/// A response is judged by the smaller of the two thresholds, the client's and the one the server named in its
/// `Welcome` ([`SizeHint::wants_session_in`] learns it): a server whose threshold is lower would have sent it
/// through shared memory.
#[derive(Debug)]
pub struct SizeHint {
    /// The smaller of the client's threshold and the server's (once a session told it).
    threshold: AtomicUsize,
    /// Responses below the threshold seen, up to [`SizeHint::LEARNING_CALLS`].
    small: AtomicU32,
    /// Whether a message at or above the threshold was seen (for good).
    large: AtomicBool,
}

impl SizeHint {
    /// The calls of a method that carry the header whatever their sizes, before its sizes are trusted.
    pub const LEARNING_CALLS: u32 = 16;

    /// A method not seen yet, whose messages of `threshold` bytes and more travel through shared memory.
    pub fn new(threshold: usize) -> SizeHint {
        SizeHint { threshold: AtomicUsize::new(threshold), small: AtomicU32::new(0), large: AtomicBool::new(false) }
    }

    /// Whether the next call should carry the session's header whatever its request (see the type).
    pub fn wants_session(&self) -> bool {
        self.large.load(Ordering::Relaxed) || self.small.load(Ordering::Relaxed) < Self::LEARNING_CALLS
    }

    /// [`Self::wants_session`] for a call in `session`, whose server's threshold (protocol §4, `Welcome`) then
    /// judges the responses too, if it is the lower one.
    pub fn wants_session_in(&self, session: &CoreSession) -> bool {
        if let Some(t) = session.peer_threshold() {
            self.lower_threshold(t);
        }
        self.wants_session()
    }

    /// Judges messages by `threshold` from now on if it is lower than the one used so far.
    pub fn lower_threshold(&self, threshold: usize) {
        if threshold < self.threshold.load(Ordering::Relaxed) {
            self.threshold.fetch_min(threshold, Ordering::Relaxed);
        }
    }

    /// A message of the method, `len` bytes long (a response, or a request about to be sent).
    pub fn saw(&self, len: usize) {
        if len >= self.threshold.load(Ordering::Relaxed) {
            self.saw_large();
        } else if self.small.load(Ordering::Relaxed) < Self::LEARNING_CALLS {
            // Racing calls may count past the limit by a few: harmless.
            self.small.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A message of the method that travels (or would have travelled) through shared memory: a reference
    /// received, a request at or above the threshold.
    pub fn saw_large(&self) {
        self.large.store(true, Ordering::Relaxed);
    }
}

/// A loan of ordinary memory, for a binding's channel without a session: the same code then sends the message
/// inline.
pub fn heap_loan(len: usize) -> Loan {
    Loan::heap(len)
}

/// Whether `message` is a reference (the first bytes of field 19999), not an inline message.
pub fn is_reference(message: &[u8]) -> bool {
    wire::is_reference(message)
}

/// The session a reference names, on our side `side`.
fn session_of(r: &Reference, side: Side) -> Result<Arc<Session>, Status> {
    let ours = Side::of_sender(r.from_server).peer();
    let unknown = || Status::failed_precondition("shmgrpc reference to an unknown or closed session");
    if ours != side {
        return Err(unknown());
    }
    Session::lookup(&r.session, ours).ok_or_else(unknown)
}

/// Whether resolving the reference `message` on side `side` would wait for the registration of a segment it names.
fn needs_wait(message: &[u8], side: Side) -> bool {
    let Ok(r) = wire::decode_reference(message) else { return false };
    session_of(&r, side).is_ok_and(|s| s.awaits_registration(&r))
}

/// Resolves the reference `message` (a gRPC message that [`is_reference`]) received on side `side`. With `wait`, a
/// reference that overtook the registration of a segment it names waits for it, blocking the calling thread for at
/// most 2 s (protocol §6); without, it fails as a reference to an unknown segment would. Counts the message.
fn receive(message: &[u8], side: Side, wait: bool) -> Result<Received, Status> {
    let r = match wire::decode_reference(message) {
        Ok(r) => r,
        Err(e) => {
            stats::global(Event::BadReference);
            return Err(Status::invalid_argument(format!("bad shmgrpc reference: {e}")));
        }
    };
    let session = session_of(&r, side).inspect_err(|_| stats::global(Event::BadReference))?;
    if wait && session.awaits_registration(&r) {
        let (s, r2) = (session.clone(), r.clone());
        let notify = session.registrations().clone();
        let _ = block_on_io(async move { until(&notify, REGISTRATION_WAIT, || !s.awaits_registration(&r2)).await });
    }
    let recorder = session.recorder().clone();
    if !session.is_alive() {
        // It closed while the reference waited for its registration (§9): as a reference to a closed session.
        recorder.record_both(Event::BadReference);
        return Err(Status::failed_precondition("shmgrpc reference to an unknown or closed session"));
    }
    match session.resolve(r) {
        Ok(Resolved { parts, segments }) => {
            let received = Received { parts, segments };
            recorder.record_both(Event::ShmReceived(received.len()));
            Ok(received)
        }
        Err(status) => {
            recorder.record_both(Event::BadReference);
            Err(status)
        }
    }
}

/// Waits until `ready()` holds (checked on every notification of `notify`) or `limit` has passed; whether it holds.
async fn until(notify: &Notify, limit: Duration, ready: impl Fn() -> bool) -> bool {
    let waited = tokio::time::timeout(limit, async {
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ready() {
                return;
            }
            notified.await;
        }
    })
    .await;
    waited.is_ok() || ready()
}

/// Runs `fut` on the I/O runtime and blocks the calling thread until it is done (`None` if the runtime cannot
/// run it). Never call it on the I/O thread.
fn block_on_io<F>(fut: F) -> Option<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    crate::io::spawn(async move {
        let _ = tx.send(fut.await);
    })
    .ok()?;
    rx.recv().ok()
}

// ---- top-level fields of a message given as parts (for bindings that parse pieces in place) ----

/// The one top-level length-delimited field `number` of the message `parts` make, when its content lies in one
/// part: that content (a slice of the part, no copy) and every other field's encoding, concatenated. `None` when
/// the field is absent or repeated, its content spans parts, or the message is not well-formed protobuf. A
/// binding hands the content out in place (a view) and parses the rest.
pub fn split_field(parts: &[Bytes], number: u32) -> Option<(Bytes, Vec<u8>)> {
    let fields = top_level_fields(parts)?;
    let mut found = fields.iter().filter(|f| f.number == number);
    let (Some(field), None) = (found.next(), found.next()) else { return None };
    let (start, end) = field.content?;
    let content = slice_within(parts, start, end)?;
    let mut rest = Vec::new();
    for f in fields.iter().filter(|f| f.number != number) {
        rest.extend(range_bytes(parts, f.start, f.end));
    }
    Some((content, rest))
}

/// Whether every boundary between `parts` falls between two top-level fields of the message they make: then
/// parsing the first part and merging the others in order gives the message (protobuf merges concatenated
/// encodings), without joining them.
pub fn aligned(parts: &[Bytes]) -> bool {
    let Some(fields) = top_level_fields(parts) else { return false };
    let mut at = 0;
    for p in &parts[..parts.len().saturating_sub(1)] {
        at += p.len();
        if at != 0 && !fields.iter().any(|f| f.end == at) {
            return false;
        }
    }
    true
}

/// One top-level field of a message: its encoding's range, and its content's for a length-delimited field (in
/// offsets of the whole message).
struct Field {
    number: u32,
    start: usize,
    end: usize,
    content: Option<(usize, usize)>,
}

/// The byte at `at` of the concatenation of `parts`.
fn byte_at(parts: &[Bytes], mut at: usize) -> Option<u8> {
    for p in parts {
        if at < p.len() {
            return Some(p[at]);
        }
        at -= p.len();
    }
    None
}

fn varint(parts: &[Bytes], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = byte_at(parts, *at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The top-level fields of the message `parts` make, or `None` if it is not well-formed protobuf.
fn top_level_fields(parts: &[Bytes]) -> Option<Vec<Field>> {
    let total: usize = parts.iter().map(Bytes::len).sum();
    let mut at = 0;
    let mut out = Vec::new();
    while at < total {
        let start = at;
        let key = varint(parts, &mut at)?;
        let number = u32::try_from(key >> 3).ok().filter(|&n| n > 0)?;
        let mut content = None;
        match key & 7 {
            0 => {
                varint(parts, &mut at)?;
            }
            1 => at = at.checked_add(8)?,
            5 => at = at.checked_add(4)?,
            2 => {
                let n = usize::try_from(varint(parts, &mut at)?).ok()?;
                let end = at.checked_add(n)?;
                content = Some((at, end));
                at = end;
            }
            _ => return None,
        }
        if at > total {
            return None;
        }
        out.push(Field { number, start, end: at, content });
    }
    Some(out)
}

/// `start..end` of the concatenation as a slice of one part (no copy), if it lies in one.
fn slice_within(parts: &[Bytes], start: usize, end: usize) -> Option<Bytes> {
    let mut base = 0;
    for p in parts {
        if start >= base && end <= base + p.len() {
            return Some(p.slice(start - base..end - base));
        }
        base += p.len();
    }
    None
}

/// A copy of `start..end` of the concatenation.
fn range_bytes(parts: &[Bytes], start: usize, end: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(end - start);
    let mut base = 0;
    for p in parts {
        let (a, b) = (start.max(base), end.min(base + p.len()));
        if a < b {
            out.extend_from_slice(&p[a - base..b - base]);
        }
        base += p.len();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_size_hint_leaves_the_header_off_only_after_its_learning_calls_saw_small_messages() {
        let hint = SizeHint::new(1000);
        for _ in 0..SizeHint::LEARNING_CALLS {
            assert!(hint.wants_session(), "the learning calls carry the header");
            hint.saw(999);
        }
        assert!(!hint.wants_session(), "every message was small");
        hint.saw(1000);
        assert!(hint.wants_session(), "a message at the threshold");
        for _ in 0..100 {
            hint.saw(1);
        }
        assert!(hint.wants_session(), "a large message is remembered for good");

        let hint = SizeHint::new(1000);
        hint.saw_large();
        for _ in 0..100 {
            hint.saw(1);
        }
        assert!(hint.wants_session(), "a large request before any response");
    }

    #[test]
    fn a_size_hint_judges_responses_by_the_servers_threshold_when_it_is_lower() {
        let hint = SizeHint::new(1000);
        hint.lower_threshold(2000);
        for _ in 0..SizeHint::LEARNING_CALLS {
            hint.saw(999);
        }
        assert!(!hint.wants_session(), "a higher threshold of the server's changes nothing");
        hint.lower_threshold(500);
        hint.saw(600);
        assert!(hint.wants_session(), "600 bytes would have come through the server's shared memory");
    }

    fn key(number: u32, wire: u32) -> Vec<u8> {
        let mut v = Vec::new();
        prost::encoding::encode_varint(u64::from(number << 3 | wire), &mut v);
        v
    }

    /// A message of fields `(number, Some(bytes))` (length-delimited) or `(number, None)` (a varint 7), each
    /// field's encoding as its own part.
    fn message(fields: &[(u32, Option<Vec<u8>>)]) -> Vec<Bytes> {
        fields
            .iter()
            .map(|(n, v)| {
                let mut out = Vec::new();
                match v {
                    Some(b) => {
                        out.extend(key(*n, 2));
                        prost::encoding::encode_varint(b.len() as u64, &mut out);
                        out.extend_from_slice(b);
                    }
                    None => {
                        out.extend(key(*n, 0));
                        out.push(7);
                    }
                }
                Bytes::from(out)
            })
            .collect()
    }

    proptest! {
        /// Peer bytes never make the scanners panic, however they are cut into parts.
        #[test]
        fn any_bytes_in_any_parts_are_scanned_without_panic(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(0usize..300, 0..6),
            number in 0u32..20,
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= data.len()).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                parts.push(Bytes::copy_from_slice(&data[at..c.max(at)]));
                at = c.max(at);
            }
            let _ = aligned(&parts);
            if let Some((content, rest)) = split_field(&parts, number) {
                prop_assert!(content.len() + rest.len() <= data.len());
            }
        }

        /// A well-formed message cut between its fields: aligned, and a unique length-delimited field comes out
        /// in place, with the others' encodings as the rest.
        #[test]
        fn a_field_comes_out_in_place_and_the_rest_is_the_other_fields(
            values in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)), 1..6),
        ) {
            let fields: Vec<(u32, Option<Vec<u8>>)> =
                values.into_iter().enumerate().map(|(i, v)| (i as u32 + 1, v)).collect();
            let parts = message(&fields);
            prop_assert!(aligned(&parts));
            for (i, (n, v)) in fields.iter().enumerate() {
                match (v, split_field(&parts, *n)) {
                    (Some(b), Some((content, rest))) => {
                        prop_assert_eq!(&content[..], &b[..]);
                        let others: Vec<u8> =
                            parts.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, p)| p.to_vec()).collect();
                        prop_assert_eq!(rest, others);
                    }
                    (None, found) => prop_assert!(found.is_none(), "a varint field has no content"),
                    (Some(_), None) => prop_assert!(false, "field {} not found", n),
                }
            }
        }
    }

    #[test]
    fn a_field_split_across_parts_is_not_handed_out_and_breaks_alignment() {
        let whole = message(&[(1, Some(vec![9; 10]))]).concat();
        let parts = vec![Bytes::copy_from_slice(&whole[..4]), Bytes::copy_from_slice(&whole[4..])];
        assert!(split_field(&parts, 1).is_none());
        assert!(!aligned(&parts));
        let repeated = message(&[(1, Some(vec![1])), (1, Some(vec![2]))]);
        assert!(split_field(&repeated, 1).is_none(), "a repeated field is not one field");
    }
}
