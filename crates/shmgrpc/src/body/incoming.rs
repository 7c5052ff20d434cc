//! [`HoldBack`]: a call's incoming body, holding back a reference whose segment's registration has not arrived
//! (see the module docs of `body`).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::Frame;

use super::Wait;
use crate::proto::v1;
use crate::protocol::{MAX_REFERENCE_LEN, REGISTRATION_WAIT, Side};
use crate::session::Session;
use crate::stats::{Event, Recorder};
use crate::wire::{self, Kind};

/// gRPC message framing: a compressed flag, then a 4-byte big-endian length.
pub(super) const HEADER: usize = 5;

/// Where [`HoldBack`] stands in the gRPC message stream.
enum Scan {
    /// Reading a message header (and the first bytes of its body, to recognise a reference).
    Header(Vec<u8>),
    /// Passing through the rest of an ordinary message.
    Passing(usize),
    /// Collecting a reference message whole (header included).
    Collecting(BytesMut, usize),
}

/// How many body bytes after the header tell a reference from an ordinary message.
const PEEK: usize = 3;

/// A call's incoming body that holds back a message naming a segment whose registration has not arrived (see the
/// module docs).
///
/// Dropped before its end (an interceptor or auth layer rejected the call before its handler ran, a handler stopped
/// reading a stream, the stream was reset), it gives back what the peer lent in the messages nobody decoded: those
/// already received at once. In a session that numbers calls (protocol version 3) it then tells the peer how many
/// messages of the call it read (`CallEnd`), and the peer drops the holds of the rest, which HTTP/2 discards with
/// the stream. With a version 2 peer it reads the rest of a body nobody read from a task on the I/O runtime for at
/// most [`REGISTRATION_WAIT`], and answers what arrives.
pub(crate) struct HoldBack<B> {
    /// `None` once dropped (handed to the drain).
    inner: Option<B>,
    scanner: Scanner,
    trailers: Option<http::HeaderMap>,
    /// The inner body ended (or failed).
    done: bool,
    /// The inner body reached its end (trailers, or the end of the stream): the peer's messages all arrived.
    finished: bool,
    /// Whether anyone read it: a body dropped unread (its call rejected before its handler ran) is read to its end
    /// in the background (version 2); one dropped while being read (a stream its reader abandoned) only for what
    /// has arrived, so that the peer learns at once that the call is over and stops sending.
    polled: bool,
    /// The call's session and number, in a session that numbers calls: where the `CallEnd` goes.
    call: Option<(Arc<Session>, u64)>,
    /// Reads the rest of a body dropped early (set where `B`'s bounds are known).
    drain: Drain<B>,
}

/// What [`drain`] is given: the body (`None` if it failed), what was scanned, the call, and whether to read to the
/// end.
type Drain<B> = fn(Option<B>, Scanner, Option<(Arc<Session>, u64)>, bool);

impl<B> Drop for HoldBack<B> {
    fn drop(&mut self) {
        let side = self.scanner.side;
        let mut scanner = std::mem::replace(&mut self.scanner, Scanner::new(side, None));
        if self.finished {
            scanner.release_unread();
            return;
        }
        let inner = if self.done { None } else { self.inner.take() };
        (self.drain)(inner, scanner, self.call.take(), !self.polled);
    }
}

/// Most frames read from a dropped body at once: what the peer sent before the call ended is bounded by HTTP/2
/// flow control; this bounds the work of one `Drop`.
const MAX_DRAINED_FRAMES: usize = 4096;

/// Scans what has arrived of `inner`, without waiting; whether the stream goes on (it neither ended nor failed).
fn read_arrived<B: http_body::Body<Data = Bytes> + Unpin>(inner: &mut B, sc: &mut Scanner) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for _ in 0..MAX_DRAINED_FRAMES {
        match Pin::new(&mut *inner).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    sc.feed(data);
                }
            }
            Poll::Ready(_) => return false,
            Poll::Pending => break,
        }
    }
    true
}

/// Answers every reference message of a body dropped before its end that arrived and nobody decoded (see
/// [`Scanner::release_unread`]). In a numbered call, then tells the peer how many messages it read (`CallEnd`),
/// unless the stream was at its end: the messages HTTP/2 still buffers are dropped with the body, and the peer
/// drops their holds. Otherwise (a version 2 peer) reads what has arrived too, and, if `to_end` and the stream goes
/// on, the rest from a task on the I/O runtime for at most [`REGISTRATION_WAIT`], answering it all.
fn drain<B>(mut inner: Option<B>, mut sc: Scanner, call: Option<(Arc<Session>, u64)>, to_end: bool)
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
{
    if let Some((session, call)) = call {
        let at_end = inner.as_ref().is_some_and(|b| b.is_end_stream());
        drop(inner);
        sc.release_unread();
        if !at_end {
            session.end_call(call, sc.messages);
        }
        return;
    }
    let goes_on = inner.as_mut().is_some_and(|b| read_arrived(b, &mut sc));
    let Some(mut inner) = inner.filter(|_| goes_on && to_end) else {
        sc.release_unread();
        return;
    };
    let rest = async move {
        let read = async {
            while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut inner).poll_frame(cx)).await {
                if let Ok(data) = frame.into_data() {
                    sc.feed(data);
                }
            }
        };
        let _ = tokio::time::timeout(REGISTRATION_WAIT, read).await;
        sc.release_unread();
    };
    if let Err(e) = crate::io::spawn(rest) {
        tracing::debug!(error = %e, "the rest of a dropped body is not read");
    }
}

/// The gRPC message stream of a call as `HoldBack` reads it.
struct Scanner {
    side: Side,
    /// Counts the messages that arrive inline (references are counted by the decoder, which resolves them).
    recorder: Option<Arc<Recorder>>,
    scan: Scan,
    /// Bytes ready to hand on, in order.
    ready: VecDeque<Bytes>,
    /// The reference messages among `ready` (the same chunks), until handed on: released if nobody ever decodes
    /// them.
    unread: VecDeque<Bytes>,
    /// The body is being dropped: nothing is held back any more.
    draining: bool,
    /// The reference message being held back.
    held: Option<Held>,
    /// Bytes that arrived behind the held message, not scanned yet.
    backlog: VecDeque<Bytes>,
    /// Messages that arrived whole (what a `CallEnd` reports).
    messages: u64,
}

/// A complete reference message waiting for registrations.
struct Held {
    message: Bytes,
    session: Arc<Session>,
    reference: wire::Reference,
    wait: Wait,
}

impl<B: http_body::Body<Data = Bytes> + Unpin + Send + 'static> HoldBack<B> {
    /// Wraps the incoming body of a call on `side`'s end, counting its inline messages for `recorder`; `call` is
    /// the call's session and number, in a session that numbers calls.
    pub(crate) fn new(inner: B, side: Side, recorder: Arc<Recorder>, call: Option<(Arc<Session>, u64)>) -> Self {
        let scanner = Scanner::new(side, Some(recorder));
        HoldBack {
            inner: Some(inner),
            scanner,
            trailers: None,
            done: false,
            finished: false,
            polled: false,
            call,
            drain: drain::<B>,
        }
    }
}

/// Whether a message with this header byte, length and first body bytes is a reference to look at.
fn is_reference_message(flag: u8, len: usize, first: &[u8]) -> bool {
    flag == 0 && len <= MAX_REFERENCE_LEN && wire::is_reference(first)
}

impl Scanner {
    fn new(side: Side, recorder: Option<Arc<Recorder>>) -> Self {
        Scanner {
            side,
            recorder,
            scan: Scan::Header(Vec::new()),
            ready: VecDeque::new(),
            unread: VecDeque::new(),
            draining: false,
            held: None,
            backlog: VecDeque::new(),
            messages: 0,
        }
    }

    /// An ordinary (inline) message of `len` bytes begins.
    fn inline_message(&self, len: usize) {
        if let Some(r) = &self.recorder {
            r.record(Event::InlineReceived(len));
        }
    }

    /// Splits received data into pass-through chunks and whole reference messages; once a message is held, the rest
    /// goes to the backlog. Ordinary messages are handed on as slices of the data received, without a copy: a chunk
    /// that holds no reference comes out as the same one chunk.
    fn feed(&mut self, data: Bytes) {
        if self.held.is_some() {
            self.backlog.push_back(data);
            return;
        }
        // `data[run..pos]` is pass-through not yet handed on.
        let (mut run, mut pos) = (0, 0);
        while pos < data.len() {
            let avail = &data[pos..];
            match &mut self.scan {
                Scan::Header(buf) if buf.is_empty() && avail.len() >= HEADER => {
                    let len = u32::from_be_bytes(avail[1..5].try_into().expect("4 bytes")) as usize;
                    let need = HEADER + len.min(PEEK);
                    if avail.len() < need {
                        buf.extend_from_slice(avail);
                        push_slice(&mut self.ready, &data, run, pos);
                        (run, pos) = (data.len(), data.len());
                        continue;
                    }
                    let take = (HEADER + len).min(avail.len());
                    if is_reference_message(avail[0], len, &avail[HEADER..need]) {
                        push_slice(&mut self.ready, &data, run, pos);
                        let mut msg = BytesMut::with_capacity(HEADER + len);
                        msg.extend_from_slice(&avail[..take]);
                        self.scan = Scan::Collecting(msg, HEADER + len - take);
                        pos += take;
                        run = pos;
                    } else {
                        self.inline_message(len);
                        self.scan = Scan::Passing(HEADER + len - take);
                        pos += take;
                    }
                }
                Scan::Header(buf) => {
                    // A header split across chunks (rare): gathered byte by byte, then decided.
                    push_slice(&mut self.ready, &data, run, pos);
                    let need = |buf: &Vec<u8>| {
                        if buf.len() < HEADER {
                            HEADER
                        } else {
                            HEADER + (u32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize).min(PEEK)
                        }
                    };
                    while buf.len() < need(buf) && pos < data.len() {
                        let take = (need(buf) - buf.len()).min(data.len() - pos);
                        buf.extend_from_slice(&data[pos..pos + take]);
                        pos += take;
                    }
                    run = pos;
                    if buf.len() < need(buf) {
                        continue;
                    }
                    let header = std::mem::take(buf);
                    let len = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
                    let rest = len - (header.len() - HEADER);
                    if is_reference_message(header[0], len, &header[HEADER..]) {
                        let mut msg = BytesMut::with_capacity(HEADER + len);
                        msg.extend_from_slice(&header);
                        self.scan = Scan::Collecting(msg, rest);
                    } else {
                        self.inline_message(len);
                        self.ready.push_back(Bytes::from(header));
                        self.scan = Scan::Passing(rest);
                    }
                }
                Scan::Passing(rest) => {
                    let n = (*rest).min(avail.len());
                    *rest -= n;
                    pos += n;
                }
                Scan::Collecting(msg, rest) => {
                    let n = (*rest).min(avail.len());
                    msg.extend_from_slice(&avail[..n]);
                    *rest -= n;
                    pos += n;
                    run = pos;
                }
            }
            self.finish_message();
            if self.held.is_some() {
                if pos < data.len() {
                    self.backlog.push_back(data.slice(pos..));
                }
                return;
            }
        }
        push_slice(&mut self.ready, &data, run, pos);
    }

    /// After a message's last byte: back to reading headers, holding a reference back if it must wait.
    fn finish_message(&mut self) {
        match &self.scan {
            Scan::Passing(0) => {
                self.messages += 1;
                self.scan = Scan::Header(Vec::new());
            }
            Scan::Collecting(_, 0) => {
                self.messages += 1;
                let Scan::Collecting(msg, _) = std::mem::replace(&mut self.scan, Scan::Header(Vec::new())) else {
                    unreachable!("matched above")
                };
                let message = msg.freeze();
                match if self.draining { None } else { hold(self.side, &message) } {
                    Some((session, reference)) => {
                        self.held = Some(Held { message, session, reference, wait: Wait::new(REGISTRATION_WAIT) })
                    }
                    None => self.ready_reference(message),
                }
            }
            _ => {}
        }
    }

    /// Hands the held message on (its registrations arrived, were refused, or the wait ended) and scans what
    /// arrived behind it.
    fn release(&mut self) {
        if let Some(h) = self.held.take() {
            self.ready_reference(h.message);
        }
        for data in std::mem::take(&mut self.backlog) {
            self.feed(data);
        }
    }

    /// Queues a whole reference message to hand on, remembering it until it is handed on.
    fn ready_reference(&mut self, message: Bytes) {
        self.unread.push_back(message.clone());
        self.ready.push_back(message);
    }

    /// The next chunk to hand on.
    fn next_ready(&mut self) -> Option<Bytes> {
        let b = self.ready.pop_front()?;
        if self.unread.front().is_some_and(|r| r.as_ptr() == b.as_ptr() && r.len() == b.len()) {
            self.unread.pop_front();
        }
        Some(b)
    }

    /// The body is dropped: every reference message that arrived and was never handed on to the decoder is
    /// answered as if it had been read and dropped, so that the peer gets its buffers back now rather than when the
    /// session ends: a `Release` for each `sender` part, a `Returned` for each `receiver` part (protocol §7).
    fn release_unread(&mut self) {
        self.draining = true;
        self.release();
        let mut released = 0;
        for message in std::mem::take(&mut self.unread) {
            let Ok(reference) = wire::decode_reference(&message[HEADER..]) else { continue };
            if Side::of_sender(reference.from_server) != self.side.peer() {
                continue;
            }
            let Some(session) = Session::lookup(&reference.session, self.side) else { continue };
            for part in &reference.parts {
                let kind = match &part.kind {
                    Some(v1::part::Kind::Sender(r)) => {
                        Kind::Release(v1::Release { segment: r.segment, generation: r.generation })
                    }
                    Some(v1::part::Kind::Receiver(r)) => {
                        Kind::Returned(v1::Returned { segment: r.segment, generation: r.generation })
                    }
                    _ => continue,
                };
                if session.send(kind, None).is_ok() {
                    released += 1;
                }
            }
        }
        if released > 0 {
            tracing::debug!(released, "gave back parts of messages nobody decoded");
        }
    }

    /// The stream ended: a message cut short is handed on as it is (tonic reports the truncation as it would
    /// have).
    fn end(&mut self) {
        match std::mem::replace(&mut self.scan, Scan::Header(Vec::new())) {
            Scan::Header(buf) if !buf.is_empty() => self.ready.push_back(Bytes::from(buf)),
            Scan::Collecting(msg, _) => self.ready.push_back(msg.freeze()),
            _ => {}
        }
    }
}

/// Hands on `data[from..to]`, if not empty.
fn push_slice(ready: &mut VecDeque<Bytes>, data: &Bytes, from: usize, to: usize) {
    if to > from {
        ready.push_back(data.slice(from..to));
    }
}

/// The session and reference of a reference message that must wait for a registration, if it must.
fn hold(side: Side, message: &[u8]) -> Option<(Arc<Session>, wire::Reference)> {
    let reference = wire::decode_reference(&message[HEADER..]).ok()?;
    // We are the other end of the session than the sender; the decoder reports a wrong or unknown session.
    if Side::of_sender(reference.from_server) != side.peer() {
        return None;
    }
    let session = Session::lookup(&reference.session, side)?;
    session.awaits_registration(&reference).then_some((session, reference))
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for HoldBack<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        this.polled = true;
        loop {
            let sc = &mut this.scanner;
            if let Some(b) = sc.next_ready() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if let Some(h) = sc.held.as_mut() {
                let session = h.session.clone();
                let reference = &h.reference;
                if h.wait.poll(cx, session.registrations(), || !session.awaits_registration(reference)).is_pending() {
                    return Poll::Pending;
                }
                // Registered, refused, closed or timed out: the decoder decides (a clean status if it cannot
                // resolve the message).
                sc.release();
                continue;
            }
            if let Some(t) = this.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let Some(inner) = this.inner.as_mut() else { return Poll::Ready(None) };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.done = true;
                    this.finished = true;
                    sc.end();
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => sc.feed(data),
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.finished = true;
                            this.trailers = Some(t);
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let sc = &self.scanner;
        self.done && sc.ready.is_empty() && sc.held.is_none() && sc.backlog.is_empty() && self.trailers.is_none()
    }
}

/// Runs a byte stream from a peer through the scanner in chunks of `chunk` bytes, as a server that has no session
/// named by it would; returns what it hands on (for tests and the fuzz target: it must equal the input).
#[cfg(any(test, fuzzing))]
pub(crate) fn scan_all(stream: &[u8], chunk: usize) -> Vec<u8> {
    let mut sc = Scanner::new(Side::Server, None);
    for c in stream.chunks(chunk.max(1)) {
        sc.feed(Bytes::copy_from_slice(c));
    }
    assert!(sc.held.is_none() && sc.backlog.is_empty(), "no session: nothing is held");
    sc.end();
    sc.ready.iter().flat_map(|b| b.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc_frame(body: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn the_scanner_passes_every_byte_through_in_order_whatever_the_chunking() {
        let mut reference = Vec::new();
        let r = wire::Reference { session: vec![1; 16].into(), from_server: false, parts: vec![] };
        wire::encode_reference(r, &mut reference);
        let mut stream = Vec::new();
        stream.extend(grpc_frame(b""));
        stream.extend(grpc_frame(&[7u8; 100_000]));
        stream.extend(grpc_frame(&reference));
        stream.extend(grpc_frame(b"ab"));
        stream.extend(grpc_frame(&reference));
        for chunk in [1, 2, 3, 5, 7, 64, 1000, 16_384, usize::MAX] {
            assert_eq!(scan_all(&stream, chunk.min(stream.len())), stream, "chunk {chunk}");
        }
    }

    #[test]
    fn a_chunk_without_references_comes_out_as_the_same_chunk() {
        let mut stream = Vec::new();
        for body in [&b"hello"[..], &[9u8; 3000][..], b""] {
            stream.extend(grpc_frame(body));
        }
        let chunk = Bytes::from(stream);
        let mut sc = Scanner::new(Side::Client, None);
        sc.feed(chunk.clone());
        assert_eq!(sc.ready.len(), 1);
        assert_eq!(sc.ready[0].as_ptr(), chunk.as_ptr(), "handed on without a copy");
        assert_eq!(sc.ready[0], chunk);
    }
}
