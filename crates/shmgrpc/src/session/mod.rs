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
//! The parts, each a type with its own state, none of which knows the others:
//!
//! - [`outbox`]: the frames queued for the peer and the writer task that sends them.
//! - [`sender`]: our buffers the peer refers to: encoding into the pool, registration, holds, the in-flight window.
//! - [`receiver`]: the peer's segments: registrations, resolving references, regions sent back.
//! - [`split`]: the encoder's buffer that turns slices already in shared memory into parts of their own.
//! - [`upkeep`]: the task that gives idle pool memory back and has peers forget the segments dropped.
//! - [`calls`]: which message of which call our references stand for, for the peer's `CallEnd` (version 3).
//! - [`loan`]: the owners behind zero-copy `Bytes` ([`Loan`], `Outgoing`, `Incoming`) that the halves pass through
//!   the session.
//!
//! [`Session`] (this file) owns the id, liveness and the process's registry of sessions, routes each frame from the
//! side channel to the half it concerns, and lends each half what it needs of the other for one call (the
//! receiver's regions to the encoder, the sender's holds to the resolver). The exchange is specified in
//! `docs/protocol.md`.

mod calls;
mod loan;
mod outbox;
mod receiver;
mod sender;
mod split;
#[cfg(test)]
mod tests;
mod upkeep;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::net::UnixStream;
use tokio::sync::Notify;

pub use loan::Loan;
pub(crate) use receiver::Resolved;
pub(crate) use sender::Outcome;

use crate::config::SessionParams;
use crate::proto::v1::{self, part};
use crate::protocol::{
    CALL_END_VERSION, CALL_SEPARATOR, MAX_SESSION_PEER_BYTES, NUMBER_IN_SESSION_HEADER_VERSION, Side, call_number,
    split_session_header,
};
use crate::side_channel::{self, FrameReader};
use crate::stats::{Event, Fallback, Recorder};
use crate::sync::lock;
use crate::wire::{Kind, Reference};
use outbox::{Drain, Outbox};
use receiver::Receiver;
use sender::Sender;

/// A session id: 16 random bytes.
pub(crate) type SessionId = [u8; 16];

/// Live sessions of this process by id and side (a process can hold both ends, for example in tests). Global
/// because the codec has no connection context: a reference names its session by id, and this is where the
/// decoder finds it.
type Registry = HashMap<(SessionId, Side), Weak<Session>>;
static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

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
    /// Regions of the peer's we sent back (`receiver` parts) and keep until it answers `Returned`.
    pub sent_back: usize,
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
            sent_back: self.sent_back + o.sent_back,
        }
    }
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

/// Takes one entry of `map` for each part of `parts` that `pick` names a region for (stale keys take nothing).
fn take_for_parts<T>(
    map: &mut ByRegion<T>,
    parts: &[crate::proto::v1::Part],
    pick: impl Fn(&part::Kind) -> Option<&crate::proto::v1::Region>,
) -> Vec<T> {
    parts
        .iter()
        .filter_map(|p| p.kind.as_ref().and_then(&pick))
        .filter_map(|r| take_one(map, (r.segment, r.generation)))
        .collect()
}

/// A side channel that has completed its handshake: what a session starts from.
pub(crate) struct Link {
    pub(crate) socket: Arc<UnixStream>,
    /// The frames read so far (whatever followed the handshake's last frame).
    pub(crate) reader: FrameReader,
    /// The peer's pid as `SO_PEERCRED` gives it (0 when the peer is in a pid namespace this one cannot see).
    pub(crate) peer_pid: u32,
    /// The protocol version the two agreed on (§2).
    pub(crate) version: u32,
    /// The threshold the peer's `Welcome` named (§4): from this size up the server sends its messages through
    /// shared memory. Known to a client only.
    pub(crate) peer_threshold: Option<usize>,
}

/// Takes the entries of `map` that belong to the message `tag` names (one per part that `pick` names a region for,
/// the entry whose tag, by `tag_of`, is `tag` itself): what is kept for a message that never reached the peer.
fn take_tagged<T>(
    map: &mut ByRegion<T>,
    tag: &Arc<calls::MessageTag>,
    pick: impl Fn(&part::Kind) -> Option<&crate::proto::v1::Region>,
    tag_of: impl Fn(&T) -> Option<&Arc<calls::MessageTag>>,
) -> Vec<T> {
    let mut taken = Vec::new();
    for r in tag.parts.iter().filter_map(|p| p.kind.as_ref().and_then(&pick)) {
        let key = (r.segment, r.generation);
        let Some(v) = map.get_mut(&key) else { continue };
        if let Some(i) = v.iter().position(|e| tag_of(e).is_some_and(|t| Arc::ptr_eq(t, tag))) {
            taken.push(v.swap_remove(i));
        }
        if v.is_empty() {
            map.remove(&key);
        }
    }
    taken
}

/// One end of an established session.
pub(crate) struct Session {
    id: SessionId,
    side: Side,
    peer_pid: u32,
    /// The protocol version agreed on (§2): from 3 on, calls are numbered and `CallEnd` is spoken.
    version: u32,
    /// The server's threshold, as its `Welcome` named it (a client's session only).
    peer_threshold: Option<usize>,
    /// The number of the client's next call (§6), from 1.
    next_call: AtomicU64,
    /// The `shmgrpc-session` header value of an unnumbered call (the id in lowercase hex), made once.
    header: http::HeaderValue,
    alive: AtomicBool,
    /// The process the session belongs to: a child made by `fork` inherits the memory of the session, never the
    /// session (its side channel and pool are the parent's).
    pid: u32,
    /// The side channel, to shut it down when the session closes.
    socket: Arc<UnixStream>,
    outbox: Arc<Outbox>,
    sender: Sender,
    receiver: Receiver,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("side", &self.side).field("peer_pid", &self.peer_pid).finish_non_exhaustive()
    }
}

impl Session {
    /// Creates the session on a side channel that has completed its handshake, registers it, and starts its
    /// reader and writer tasks on the I/O runtime.
    ///
    /// A client's session lives as long as its channel holds it. A server's session (`Side::Server`) is held by
    /// its reader task and lives exactly as long as the side-channel connection: when the peer goes, every
    /// resource of the session (descriptors included) goes with it.
    ///
    /// # Errors
    ///
    /// The I/O runtime could not be started.
    pub(crate) fn start(id: SessionId, side: Side, params: SessionParams, link: Link) -> std::io::Result<Arc<Session>> {
        let Link { socket, reader, peer_pid, version, peer_threshold } = link;
        let (outbox, drain) = Outbox::new(Some(socket.clone()));
        let recorder = params.recorder.clone();
        let session = Arc::new(Session {
            id,
            side,
            peer_pid,
            version,
            peer_threshold,
            next_call: AtomicU64::new(1),
            header: http::HeaderValue::from_str(&id.iter().map(|b| format!("{b:02x}")).collect::<String>())
                .expect("hex is a valid header value"),
            alive: AtomicBool::new(true),
            pid: crate::pid::id(),
            socket: socket.clone(),
            receiver: Receiver::new(recorder, outbox.clone(), peer_pid),
            sender: Sender::new(params, outbox.clone()),
            outbox,
        });
        // Counted before anything can close it (`close` uncounts it).
        session.sender.params().sessions.fetch_add(1, Ordering::AcqRel);
        session.recorder().session(1);
        lock(&REGISTRY).insert((id, side), Arc::downgrade(&session));
        upkeep::watch(&session.sender.params().pool);
        // The tasks hold the session weakly: it ends when its owner (the channel, the server) lets go, not when a
        // task gets round to noticing.
        let weak = Arc::downgrade(&session);
        let keep = (side == Side::Server).then(|| session.clone());
        let started = crate::io::spawn(Session::read_loop(weak.clone(), keep, socket.clone(), reader))
            .and_then(|_| crate::io::spawn(Session::write_loop(weak, socket, drain)));
        if let Err(e) = started {
            session.close();
            return Err(e);
        }
        tracing::debug!(?side, peer_pid, "shmgrpc session established");
        Ok(session)
    }

    /// The counters of the channel or server this session belongs to.
    pub(crate) fn recorder(&self) -> &Arc<Recorder> {
        &self.sender.params().recorder
    }

    pub(crate) fn id(&self) -> SessionId {
        self.id
    }

    /// Finds a live session of this process by id and side.
    pub(crate) fn lookup(id: &[u8], side: Side) -> Option<Arc<Session>> {
        let id: SessionId = id.try_into().ok()?;
        lock(&REGISTRY).get(&(id, side)).and_then(Weak::upgrade).filter(|s| s.is_alive())
    }

    /// The headers of our call numbered `call` (§6): the `shmgrpc-session` value, and the `shmgrpc-call` value
    /// when this session's version sends the number apart (version 3). From version 4 on, one header says both
    /// (`<id>.<n>`): grpcio spends a few microseconds on each metadata entry of every call.
    pub(crate) fn call_headers(&self, call: Option<u64>) -> (http::HeaderValue, Option<http::HeaderValue>) {
        match call {
            None => (self.header.clone(), None),
            Some(n) if self.number_in_session_header() => {
                let value = self.numbered_header(n);
                (http::HeaderValue::try_from(value).expect("hex and digits are a valid header value"), None)
            }
            Some(n) => (self.header.clone(), Some(http::HeaderValue::from(n))),
        }
    }

    /// Whether our calls carry their number in the session header (protocol version 4 and later, §6).
    pub(crate) fn number_in_session_header(&self) -> bool {
        self.version >= NUMBER_IN_SESSION_HEADER_VERSION
    }

    /// The version 4 `shmgrpc-session` value of call `call`: the id, a dot, the number.
    pub(crate) fn numbered_header(&self, call: u64) -> String {
        use std::fmt::Write as _;
        let hex = self.header_text();
        let mut value = String::with_capacity(hex.len() + 21);
        value.push_str(hex);
        value.push(CALL_SEPARATOR);
        let _ = write!(value, "{call}");
        value
    }

    /// The session id in lowercase hex (the `shmgrpc-session` value of an unnumbered call).
    pub(crate) fn header_text(&self) -> &str {
        self.header.to_str().expect("the header is lowercase hex")
    }

    /// The live session of this process (on `side`) a call's headers name, and the call's number (§6):
    /// `session` is the call's `shmgrpc-session` value, `call` its `shmgrpc-call` value. A version 4 session
    /// takes the number from the session header and ignores `shmgrpc-call`; a version 3 session takes it from
    /// `shmgrpc-call`, and a session header with a number names no version 3 (or 2) session: there it must be the
    /// 32 hex digits alone. A number that is not one (§6) leaves the call unnumbered.
    pub(crate) fn of_call(session: &str, call: Option<&str>, side: Side) -> Option<(Arc<Session>, Option<u64>)> {
        let (hex, suffix) = split_session_header(session);
        let s = Session::lookup_hex(hex, side)?;
        let number = if s.number_in_session_header() {
            suffix.and_then(call_number)
        } else if suffix.is_some() {
            return None;
        } else if s.numbers_calls() {
            call.and_then(call_number)
        } else {
            None
        };
        Some((s, number))
    }

    /// Finds a live session from the hex id of the `shmgrpc-session` header.
    /// Only the form §6 gives names a session: 32 lowercase hex digits.
    pub(crate) fn lookup_hex(hex: &str, side: Side) -> Option<Arc<Session>> {
        if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Session::lookup(&id, side)
    }

    pub(crate) fn stats(&self) -> SessionStats {
        if !self.is_alive() {
            return SessionStats::default();
        }
        let (peer_segments, peer_bytes) = self.receiver.mapped();
        let (holds, held_bytes, shared_segments) = self.sender.figures();
        SessionStats {
            sessions: 1,
            peer_segments,
            peer_bytes,
            shared_segments,
            holds,
            held_bytes,
            sent_back: self.receiver.sent_back_count(),
        }
    }

    /// Whether the session is open, in this process (a forked child's copy never is).
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.forked()
    }

    /// Whether this is a forked child's copy of a session of its parent's.
    fn forked(&self) -> bool {
        self.pid != crate::pid::id()
    }

    /// The protocol version agreed on (§2).
    pub(crate) fn version(&self) -> u32 {
        self.version
    }

    /// Whether calls of this session are numbered and `CallEnd` is spoken (protocol version 3 and later).
    pub(crate) fn numbers_calls(&self) -> bool {
        self.version >= CALL_END_VERSION
    }

    /// A number for a new call of the client's (§6), `None` in a session that does not number calls.
    pub(crate) fn new_call(&self) -> Option<u64> {
        self.numbers_calls().then(|| self.next_call.fetch_add(1, Ordering::Relaxed))
    }

    /// Our outgoing body of call `call` begins (see [`Sender::open_call`]).
    pub(crate) fn open_call(&self, call: u64) {
        self.sender.open_call(call);
    }

    /// Our outgoing body of call `call` is gone (see [`Sender::close_call`]).
    pub(crate) fn close_call(&self, call: u64) {
        self.sender.close_call(call);
    }

    /// Tells the peer that we read only the first `received` messages of its call `call` (protocol §7): the
    /// stream ended early, and the rest never arrive.
    pub(crate) fn end_call(&self, call: u64, received: u64) {
        if self.numbers_calls()
            && let Err(e) = self.send(Kind::CallEnd(v1::CallEnd { call, received }), None)
        {
            tracing::debug!(error = %e, "call end not sent; the session is closing");
        }
    }

    pub(crate) fn threshold(&self) -> usize {
        self.sender.params().threshold
    }

    /// The threshold the server named in its `Welcome`: its messages from this size up come through shared
    /// memory. `None` on the server's side, which is not told the client's.
    pub(crate) fn peer_threshold(&self) -> Option<usize> {
        self.peer_threshold
    }

    /// Whether `data` lies inside one of the peer's segments we have mapped or one of our pool's buffers.
    pub(crate) fn maps(&self, data: &[u8]) -> bool {
        self.receiver.maps(data) || self.sender.params().pool.contains(data)
    }

    /// Queues a frame for the peer. Never blocks, on any thread, inside a runtime or not (see [`outbox`]).
    pub(crate) fn send(&self, kind: Kind, fd: Option<OwnedFd>) -> std::io::Result<()> {
        Ok(self.outbox.send(kind, fd)?)
    }

    /// A loan of `len` bytes from this session's pool; ordinary memory when the session is closed or the pool is
    /// out of budget.
    pub(crate) fn loan(self: &Arc<Self>, len: usize) -> Loan {
        if !self.is_alive() {
            return Loan::heap(len);
        }
        match self.sender.loan_lease(len) {
            Some(lease) => Loan::shared(lease, Arc::downgrade(self)),
            None => Loan::heap(len),
        }
    }

    /// Encodes `item` (of `len` encoded bytes) for the peer and returns the reference to send in its place (see
    /// [`Sender::encode`]), with the segments it names that the peer has not acknowledged yet; the
    /// peer's regions it sends back are kept until the peer answers `Returned`. `message` is the call's number and
    /// the message's index in it, in a session that numbers calls.
    pub(crate) fn encode_to_shm<M: Message>(
        &self,
        item: &M,
        len: usize,
        message: Option<(u64, u64)>,
    ) -> Result<(Reference, Vec<u32>), Fallback> {
        if !self.is_alive() {
            return Err(Fallback::SessionClosed);
        }
        let encoded = self.sender.encode(item, len, &self.receiver, message)?;
        self.receiver.keep_sent_back(encoded.sent_back, encoded.tag.as_ref());
        if encoded.lost
            && let Some(tag) = &encoded.tag
        {
            // The peer ended the call before this message: it goes out, but nothing waits for an answer to it.
            self.sender.cancel_tagged(tag);
            self.receiver.cancel_tagged(tag);
        }
        let reference = Reference {
            session: Bytes::copy_from_slice(&self.id),
            from_server: self.side == Side::Server,
            parts: encoded.parts,
        };
        Ok((reference, encoded.unacknowledged))
    }

    /// Where our `segments` stand with the peer: acknowledged, answer pending, or refused.
    pub(crate) fn outcome(&self, segments: &[u32]) -> Outcome {
        if !self.is_alive() {
            return Outcome::Refused;
        }
        self.sender.outcome(segments)
    }

    /// Stops waiting for the peer's answer for `segments` (see [`Sender::give_up`]).
    pub(crate) fn give_up(&self, segments: &[u32]) {
        self.sender.give_up(segments);
    }

    /// The bytes of the message a reference of ours stands for, copied from our own buffers and the regions we
    /// sent back, so that it can go inline instead; then the reference's holds are dropped (it never reaches the
    /// peer). `None` if the session closed meanwhile (its holds are gone): the message cannot be rebuilt.
    pub(crate) fn take_back(&self, r: &Reference) -> Option<Vec<u8>> {
        let len: u64 = r
            .parts
            .iter()
            .map(|p| match &p.kind {
                Some(part::Kind::Inline(b)) => b.len() as u64,
                Some(part::Kind::Sender(r) | part::Kind::Receiver(r)) => r.len,
                None => 0,
            })
            .sum();
        let mut out = Vec::with_capacity(usize::try_from(len).ok()?);
        for p in &r.parts {
            match &p.kind {
                Some(part::Kind::Inline(b)) => out.extend_from_slice(b),
                Some(part::Kind::Sender(region)) => self.sender.copy_held(region, &mut out)?,
                Some(part::Kind::Receiver(region)) => self.receiver.copy_sent_back(region, &mut out)?,
                None => return None,
            }
        }
        self.sender.cancel_holds(&r.parts);
        self.receiver.cancel_sent_back(&r.parts);
        Some(out)
    }

    /// Bytes of ours the peer holds, and the window they may fill.
    pub(crate) fn window_use(&self) -> (u64, u64) {
        (self.sender.held(), self.sender.params().window)
    }

    /// Resolves a reference the peer sent (see [`Receiver::resolve`]); `receiver` parts name our buffers the peer
    /// holds.
    pub(crate) fn resolve(&self, r: Reference) -> Result<Resolved, tonic::Status> {
        self.receiver.resolve(r, |segment, generation| self.sender.held_buffer(segment, generation))
    }

    /// Whether a reference names a segment whose registration has not arrived yet (the body holds it back).
    pub(crate) fn awaits_registration(&self, r: &Reference) -> bool {
        self.is_alive() && self.receiver.awaits_registration(r)
    }

    /// Woken when the peer registers (or we refuse) a segment, or the session closes.
    pub(crate) fn registrations(&self) -> &Arc<Notify> {
        self.receiver.registrations()
    }

    /// How long sending waits for the window before going inline.
    pub(crate) fn window_wait(&self) -> Duration {
        self.sender.params().window_wait
    }

    /// Woken by every release of the peer's, every answer to a registration, and when the session closes.
    pub(crate) fn progress(&self) -> &Arc<Notify> {
        self.sender.progress()
    }

    /// Whether the last allocation found the pool out of budget and no buffer has come back since (while a wait
    /// for one is configured).
    pub(crate) fn pool_short(&self) -> bool {
        self.sender.pool_short()
    }

    /// How long a call may wait for a buffer to come back before its messages go inline.
    pub(crate) fn exhausted_wait(&self) -> Duration {
        self.sender.exhausted_wait()
    }

    /// Woken whenever a buffer comes back to the pool.
    pub(crate) fn pool_returns(&self) -> &Arc<Notify> {
        self.sender.params().pool.returns()
    }

    /// The writer task: sends queued frames until the session closes; a failed or stalled write closes it.
    async fn write_loop(weak: Weak<Session>, sock: Arc<UnixStream>, drain: Drain) {
        if let Err(e) = drain.write_to(&sock).await
            && let Some(s) = weak.upgrade()
        {
            tracing::debug!(error = %e, "side-channel write failed; closing the session");
            s.close();
        }
    }

    /// The reader task: routes each frame to the half it concerns. Ends with the connection or with the session.
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
            if this.outbox.overflowed() {
                this.recorder().record_both(Event::PeerRefusal);
                tracing::debug!(side = ?this.side, "the peer does not read its side channel; session closed");
            } else {
                tracing::debug!(side = ?this.side, reason = %why, "shmgrpc session closed");
            }
            this.close();
        }
        drop(keep);
    }

    /// Routes one frame from the peer to the half it concerns; `Err` ends the session.
    fn on_frame(&self, kind: Kind, fd: Option<OwnedFd>) -> Result<(), String> {
        match kind {
            Kind::Register(reg) => return self.receiver.on_register(reg, fd),
            Kind::Registered(ack) => self.sender.on_registered(ack),
            Kind::Release(rel) => self.sender.on_release(rel.segment, rel.generation),
            Kind::Returned(ret) => self.receiver.on_returned(ret.segment, ret.generation),
            Kind::Forget(f) => self.receiver.on_forget(f.segment),
            Kind::CallEnd(end) if self.numbers_calls() => {
                for tag in self.sender.on_call_end(end.call, end.received) {
                    self.recorder().record_both(Event::LostInFlight);
                    self.sender.cancel_tagged(&tag);
                    self.receiver.cancel_tagged(&tag);
                }
            }
            Kind::Refused(r) => return Err(format!("peer refused: {}", r.reason)),
            _ => return Err("unexpected frame on an established side channel".to_string()),
        }
        Ok(())
    }

    /// Ends the session: what the peer held comes back, the peer's mappings go (readers keep theirs until they
    /// drop them), and everything waiting on the session is woken.
    pub(crate) fn close(&self) {
        if self.forked() {
            // A forked child's copy: the socket and the pool are shared with the parent, whose session goes on.
            // Nothing is shut down, sent or given back; the copy only stops being found.
            if self.alive.swap(false, Ordering::AcqRel) {
                lock(&REGISTRY).remove(&(self.id, self.side));
            }
            return;
        }
        if !self.alive.swap(false, Ordering::AcqRel) {
            return;
        }
        {
            let mut reg = lock(&REGISTRY);
            if reg.get(&(self.id, self.side)).is_some_and(|w| w.upgrade().is_none_or(|s| std::ptr::eq(&*s, self))) {
                reg.remove(&(self.id, self.side));
            }
        }
        self.outbox.close();
        side_channel::shutdown(&self.socket);
        let back = self.sender.close();
        self.receiver.close();
        self.recorder().session(-1);
        self.sender.params().sessions.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!(side = ?self.side, reclaimed = back, "shmgrpc session torn down");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.forked() {
            // The side channel's socket is registered with the parent's reactor, whose epoll instance the child
            // shares: dropping the socket here would deregister it for the parent too. The child keeps it for good.
            std::mem::forget(self.socket.clone());
        }
        self.close();
    }
}

/// Whether `data` lies in shared memory of a live shmgrpc session: a peer's segment or one of our pool buffers (a
/// payload received through shmgrpc, or echoed back to us without a copy).
pub fn is_shared(data: &[u8]) -> bool {
    let sessions: Vec<Arc<Session>> = lock(&REGISTRY).values().filter_map(Weak::upgrade).collect();
    sessions.iter().any(|s| s.maps(data))
}

// The caps nest: a session's within a peer's share, a peer's share within the process's.
const _: () = assert!(MAX_SESSION_PEER_BYTES <= crate::protocol::MAX_PEER_BYTES);
const _: () = assert!(crate::protocol::MAX_PEER_BYTES <= crate::protocol::MAX_PROCESS_PEER_BYTES);
