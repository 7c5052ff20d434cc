//! [`SessionBody`]: a call's outgoing body, polled with its session current, holding back messages that must wait
//! before they leave (see the module docs of `body`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;

use super::incoming::HEADER;
use super::{Current, Enter, Wait};
use crate::protocol::REGISTRATION_WAIT;
use crate::session::{Outcome, Session};
use crate::stats::{Event, Fallback, Recorder};
use crate::wire;

/// A message the encoder sent as a reference that must wait before it leaves.
pub(crate) struct Gate {
    /// Which reference of its chunk it is (0 for the chunk's first reference message).
    pub(crate) ordinal: usize,
    pub(crate) reference: wire::Reference,
    /// The message's encoded size (what the counters count).
    pub(crate) len: usize,
    /// Our segments it names whose registration the peer has not answered yet.
    pub(crate) unacknowledged: Vec<u32>,
    /// Whether it waits for the in-flight window (the call's first message through shared memory, sent while the
    /// window was full).
    pub(crate) window: bool,
    /// Bytes of ours it has the peer hold (its `sender` parts).
    pub(crate) held: u64,
}

/// Where a gate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The message may leave as a reference.
    Open,
    /// Still waiting.
    Waiting,
    /// It must go inline: the peer refused a segment it names.
    Refused,
}

impl Gate {
    fn state(&self, session: &Session) -> State {
        let registration =
            if self.unacknowledged.is_empty() { Outcome::Acknowledged } else { session.outcome(&self.unacknowledged) };
        if registration == Outcome::Refused {
            return State::Refused;
        }
        let (held, window) = session.window_use();
        let window_open = !self.window || held.saturating_sub(self.held) < window;
        if registration == Outcome::Acknowledged && window_open { State::Open } else { State::Waiting }
    }

    /// Whether a gate still waiting waits for a registration's answer (else only for the window).
    fn state_waits_for_registration(&self, session: &Session) -> bool {
        !self.unacknowledged.is_empty() && session.outcome(&self.unacknowledged) == Outcome::Pending
    }

    /// How long it may wait.
    fn limit(&self, session: &Session) -> Duration {
        let mut limit = Duration::MAX;
        if !self.unacknowledged.is_empty() {
            limit = limit.min(REGISTRATION_WAIT);
        }
        if self.window {
            limit = limit.min(session.window_wait());
        }
        limit
    }
}

/// A chunk of the encoded body held back for its gates.
struct Held {
    data: Bytes,
    gates: Vec<Gate>,
    wait: Wait,
}

pin_project_lite::pin_project! {
    /// A call's outgoing body, polled with its session current on the thread (see the module docs).
    pub(crate) struct SessionBody<B> {
        #[pin]
        inner: B,
        // `None` only while the inner body is polled (then it is current on the thread).
        current: Option<Current>,
        started: bool,
        wait: Option<Wait>,
        held: Option<Held>,
    }

    impl<B> PinnedDrop for SessionBody<B> {
        /// A call that ends while a message waits (the peer answered it already, or it was cancelled): the
        /// message never leaves, so its holds go.
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let (Some(held), Some(current)) = (this.held.take(), this.current.as_ref()) {
                abandon(current, held.gates);
            }
            if let Some(current) = this.current.as_ref()
                && let (Some(session), Some(call)) = (&current.session, current.call)
            {
                session.close_call(call);
            }
        }
    }
}

impl<B> SessionBody<B> {
    /// Wraps the outgoing body of a call in `session`; `call` is its number, in a session that numbers calls.
    pub(crate) fn new(inner: B, session: Arc<Session>, call: Option<u64>) -> Self {
        if let Some(call) = call {
            session.open_call(call);
        }
        let current = Current::new(None, session.recorder().clone(), session.threshold(), None);
        let current = Current { session: Some(session), call, ..current };
        SessionBody { inner, current: Some(current), started: false, wait: None, held: None }
    }

    /// Wraps the outgoing body of a call without a session, counted for `recorder`: its messages from `threshold`
    /// up count as fallbacks for `fallback`, if given.
    pub(crate) fn without_session(
        inner: B,
        recorder: Arc<Recorder>,
        threshold: usize,
        fallback: Option<Fallback>,
    ) -> Self {
        let current = Current::new(None, recorder, threshold, fallback);
        SessionBody { inner, current: Some(current), started: true, wait: None, held: None }
    }
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for SessionBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        loop {
            if let Some(held) = this.held.as_mut() {
                let current = this.current.as_mut().expect("the call is not being polled");
                let data = match poll_gates(held, current, cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(data) => data,
                };
                *this.held = None;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if !*this.started {
                let session = this.current.as_ref().and_then(|c| c.session.clone());
                if let Some(session) = session
                    && session.pool_short()
                {
                    // Configured to wait for a buffer to come back (`exhausted_wait`): before the first message,
                    // asynchronously, bounded.
                    let wait = this.wait.get_or_insert_with(|| {
                        this.current.as_ref().expect("not polled").recorder.record_both(Event::PoolWait);
                        Wait::new(session.exhausted_wait())
                    });
                    let ready = || !session.is_alive() || !session.pool_short();
                    if wait.poll(cx, session.pool_returns(), ready).is_pending() {
                        return Poll::Pending;
                    }
                }
                *this.started = true;
                *this.wait = None;
            }
            let polled = {
                let _enter = Enter::new(this.current);
                this.inner.as_mut().poll_frame(cx)
            };
            let current = this.current.as_mut().expect("put back after the poll");
            current.references = 0;
            let gates = std::mem::take(&mut current.gates);
            if gates.is_empty() {
                return polled;
            }
            match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let session = current.session.as_ref().expect("gates come from a session");
                        let limit = gates.iter().map(|g| g.limit(session)).min().unwrap_or(Duration::ZERO);
                        if gates.iter().any(|g| g.window) {
                            current.recorder.record_both(Event::WindowWait);
                        }
                        *this.held = Some(Held { data, gates, wait: Wait::new(limit) });
                    }
                    Err(frame) => {
                        abandon(current, gates);
                        return Poll::Ready(Some(Ok(frame)));
                    }
                },
                other => {
                    // tonic hands on what it encoded in the same poll; anything else means those messages are lost.
                    abandon(current, gates);
                    return other;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // A held message may leave inline, longer than its reference: no exact size can be promised.
        let hint = self.inner.size_hint();
        match hint.exact() {
            Some(_) if self.current.as_ref().is_some_and(|c| c.session.is_some()) => http_body::SizeHint::default(),
            _ => hint,
        }
    }
}

/// Drops the holds of messages that will never be sent.
fn abandon(current: &Current, gates: Vec<Gate>) {
    if let Some(session) = &current.session {
        for g in gates {
            let _ = session.take_back(&g.reference);
        }
    }
}

/// Waits until every gate of the held chunk is open, one is refused, or the wait runs out; then returns the chunk
/// to send, with the messages that may not go as references rebuilt inline.
fn poll_gates(held: &mut Held, current: &mut Current, cx: &mut Context<'_>) -> Poll<Bytes> {
    let session = current.session.clone().expect("gates come from a session");
    let settled = |gates: &[Gate]| {
        let states = gates.iter().map(|g| g.state(&session));
        let mut all_open = true;
        for s in states {
            match s {
                State::Refused => return true,
                State::Waiting => all_open = false,
                State::Open => {}
            }
        }
        all_open
    };
    if held.wait.poll(cx, session.progress(), || settled(&held.gates)).is_pending() {
        return Poll::Pending;
    }
    let mut inline: Vec<(usize, Vec<u8>)> = Vec::new();
    for g in std::mem::take(&mut held.gates) {
        let reason = match g.state(&session) {
            State::Open => {
                current.recorder.record_both(Event::ShmSent(g.len));
                continue;
            }
            State::Refused => Fallback::RegistrationFailed,
            State::Waiting if g.state_waits_for_registration(&session) => {
                session.give_up(&g.unacknowledged);
                Fallback::RegistrationFailed
            }
            State::Waiting => {
                current.window_gave_up = true;
                Fallback::WindowFull
            }
        };
        match session.take_back(&g.reference) {
            Some(bytes) => {
                tracing::trace!(%reason, len = g.len, "sending inline after all");
                current.recorder.record_both(Event::Fallback(reason));
                current.recorder.record_both(Event::InlineSent(g.len));
                inline.push((g.ordinal, bytes));
            }
            // The session closed meanwhile and took its holds with it: the reference goes as it is and fails at
            // the peer with the closed session's status.
            None => current.recorder.record_both(Event::ShmSent(g.len)),
        }
    }
    let data = std::mem::take(&mut held.data);
    if inline.is_empty() {
        return Poll::Ready(data);
    }
    Poll::Ready(rewrite(data, inline))
}

/// `data` (gRPC messages) with the reference messages named by ordinal replaced by the given message bytes, sent
/// uncompressed. A reference that cannot be found (a compressed message is not recognisable) stays as it is.
fn rewrite(data: Bytes, mut inline: Vec<(usize, Vec<u8>)>) -> Bytes {
    inline.sort_by_key(|(ordinal, _)| *ordinal);
    let extra: usize = inline.iter().map(|(_, b)| b.len()).sum();
    let mut out = BytesMut::with_capacity(data.len() + extra);
    let (mut pos, mut ordinal) = (0, 0);
    let mut next = inline.into_iter().peekable();
    while pos + HEADER <= data.len() {
        let len = u32::from_be_bytes(data[pos + 1..pos + HEADER].try_into().expect("4 bytes")) as usize;
        let end = (pos + HEADER + len).min(data.len());
        let body = &data[pos + HEADER..end];
        let mut replaced = false;
        if data[pos] == 0 && wire::is_reference(body) {
            if next.peek().is_some_and(|(o, _)| *o == ordinal)
                && let Some((_, bytes)) = next.next()
                && let Ok(n) = u32::try_from(bytes.len())
            {
                out.put_u8(0);
                out.put_u32(n);
                out.extend_from_slice(&bytes);
                replaced = true;
            }
            ordinal += 1;
        }
        if !replaced {
            out.extend_from_slice(&data[pos..end]);
        }
        pos = end;
    }
    out.extend_from_slice(&data[pos..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(flag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn reference(n: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let r = wire::Reference { session: vec![n; 16].into(), from_server: false, parts: vec![] };
        wire::encode_reference(r, &mut out);
        out
    }

    #[test]
    fn only_the_named_references_are_replaced_and_everything_else_keeps_its_place() {
        let mut chunk = Vec::new();
        chunk.extend(message(0, b"plain"));
        chunk.extend(message(0, &reference(1)));
        chunk.extend(message(1, b"compressed"));
        chunk.extend(message(0, &reference(2)));
        let out = rewrite(Bytes::from(chunk), vec![(1, b"second, inline".to_vec())]);
        let mut want = Vec::new();
        want.extend(message(0, b"plain"));
        want.extend(message(0, &reference(1)));
        want.extend(message(1, b"compressed"));
        want.extend(message(0, b"second, inline"));
        assert_eq!(&out[..], &want[..]);
    }
}
