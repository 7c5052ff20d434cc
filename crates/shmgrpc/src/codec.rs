//! The transparent path: a tonic codec that sends large messages through shared memory.
//!
//! Use it as the `codec_path` of `tonic-prost-build` (`.codec_path("shmgrpc::ShmCodec")`); generated code then
//! creates it with `Default::default()` for every call, like tonic's own prost codec.
//!
//! *Encoding.* tonic gives a codec no connection context, and polls the encoder from the HTTP/2 connection's task.
//! The shmgrpc channel and server layer therefore wrap each call's outgoing body in a session body (`body/`),
//! which makes the call's session current on the thread for exactly the duration of each poll; the encoder, which
//! runs inside that poll, looks it up. A message whose encoded size reaches the session's threshold is encoded
//! straight into a pool buffer the peer holds until it releases it, and only a reference goes on the gRPC stream.
//! The encoder never waits: a reference that must (for its segment's registration, or for the window) is noted for
//! the body, which holds it or sends the message inline instead. Without a session (a plain channel or server, a
//! plain peer, a failed handshake), the codec is byte for byte tonic's prost codec.
//!
//! *Decoding.* A reference names its session (16 secret random bytes); the decoder resolves it through that session
//! only, to a segment the session's peer registered, with an overflow-checked range, and decodes the message from a
//! `Bytes` over the mapping: `bytes` fields (built with `.bytes(...)`) point into shared memory, zero-copy. The
//! buffer goes back to its owner when the last such `Bytes` is dropped. Anything wrong is a gRPC status. A
//! reference that overtook the registration of its segment never reaches the decoder early: the incoming body
//! wrapper holds it back until the registration is in (`body/`), so the decoder never waits.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::body::Gate;
use crate::parts::PartsBuf;
use crate::protocol::Side;
use crate::session::{Resolved, Session};
use crate::stats::{self, Event, Fallback};
use crate::wire;

/// A gRPC codec for prost messages that moves large messages through shared memory (see the module docs).
pub struct ShmCodec<T, U> {
    _marker: PhantomData<(T, U)>,
}

impl<T, U> std::fmt::Debug for ShmCodec<T, U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShmCodec")
    }
}

impl<T, U> Default for ShmCodec<T, U> {
    fn default() -> Self {
        ShmCodec { _marker: PhantomData }
    }
}

impl<T, U> Codec for ShmCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ShmEncoder<T>;
    type Decoder = ShmDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ShmEncoder { last_inline: AtomicBool::new(false), _marker: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ShmDecoder(PhantomData)
    }
}

/// The encoder of [`ShmCodec`].
#[derive(Debug)]
pub struct ShmEncoder<T> {
    /// Whether the last message went inline (then tonic may gather the next ones as usual).
    last_inline: AtomicBool,
    _marker: PhantomData<T>,
}

impl<T: Message> Encoder for ShmEncoder<T> {
    type Item = T;
    type Error = Status;

    /// Inside a session, unless the last message went inline, tonic hands each encoded message on at once instead
    /// of gathering messages up to 32 KiB: a reference is a few dozen bytes, so gathering would let a ready stream
    /// encode (copy) all its frames before the first one leaves, where handing each on lets the peer work on frame
    /// 1 while frame 2 is encoded. Streams of small inline messages are gathered as by tonic's own codec.
    fn buffer_settings(&self) -> BufferSettings {
        if crate::body::has_current_session() && !self.last_inline.load(Ordering::Relaxed) {
            BufferSettings::new(8 * 1024, 1)
        } else {
            BufferSettings::default()
        }
    }

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let len = item.encoded_len();
        let sent = crate::body::with_current(|current| {
            let Some(c) = current else {
                return Outcome::Inline(None);
            };
            // Every message counts, inline ones too: the receiver's `CallEnd` counts the messages it read.
            let index = c.messages;
            c.messages += 1;
            if len < c.threshold {
                return Outcome::Inline(Some(c.recorder.clone()));
            }
            let _span = tracing::trace_span!("shmgrpc_send", len).entered();
            let Some(session) = c.session.clone() else {
                return Outcome::Fallback(c.recorder.clone(), c.fallback);
            };
            // The window holds back a call's first message through shared memory while the peer holds a full
            // window (later ones of a stream may be what the peer keeps until the call ends); once it stayed full
            // for a whole wait, the call's large messages go inline while it is full. Small messages never wait.
            let (held, window) = session.window_use();
            let full = held >= window;
            if full && c.window_gave_up {
                return Outcome::Fallback(c.recorder.clone(), Some(Fallback::WindowFull));
            }
            match session.encode_to_shm(&item, len, c.call.map(|call| (call, index))) {
                Ok((reference, unacknowledged)) => {
                    let wait_window = full && !c.window_checked;
                    c.window_checked = true;
                    let ordinal = c.references;
                    c.references += 1;
                    if unacknowledged.is_empty() && !wait_window {
                        c.recorder.record_both(Event::ShmSent(len));
                        return Outcome::Shared(reference);
                    }
                    // Counted when it leaves, as a reference or inline (`SessionBody`).
                    let held = reference
                        .parts
                        .iter()
                        .map(|p| match &p.kind {
                            Some(crate::proto::v1::part::Kind::Sender(r)) => r.len,
                            _ => 0,
                        })
                        .sum();
                    c.gates.push(Gate {
                        ordinal,
                        reference: reference.clone(),
                        len,
                        unacknowledged,
                        window: wait_window,
                        held,
                    });
                    Outcome::Shared(reference)
                }
                Err(reason) => Outcome::Fallback(c.recorder.clone(), Some(reason)),
            }
        });
        let recorder = match sent {
            Outcome::Shared(reference) => {
                wire::encode_reference(reference, dst);
                self.last_inline.store(false, Ordering::Relaxed);
                return Ok(());
            }
            Outcome::Inline(recorder) => recorder,
            Outcome::Fallback(recorder, reason) => {
                if let Some(reason) = reason {
                    tracing::trace!(%reason, len, "sending inline");
                    recorder.record_both(Event::Fallback(reason));
                }
                Some(recorder)
            }
        };
        item.encode(dst).map_err(|e| Status::internal(format!("encoding failed: {e}")))?;
        match recorder {
            Some(r) => r.record_both(Event::InlineSent(len)),
            None => stats::global(Event::InlineSent(len)),
        }
        self.last_inline.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// What the encoder decided for one message.
enum Outcome {
    /// A reference to send in its place.
    Shared(wire::Reference),
    /// Inline, below the threshold (or outside any shmgrpc call: no recorder).
    Inline(Option<Arc<crate::stats::Recorder>>),
    /// Inline although large, and why (`None`: shared memory is off, not a fallback).
    Fallback(Arc<crate::stats::Recorder>, Option<Fallback>),
}

/// The decoder of [`ShmCodec`].
#[derive(Debug)]
pub struct ShmDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for ShmDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if wire::is_reference(src.chunk()) {
            let raw = src.copy_to_bytes(src.remaining());
            let (session, resolved) = resolve(&raw);
            let record = |event| match &session {
                Some(s) => s.recorder().record_both(event),
                None => stats::global(event),
            };
            let Resolved { parts, segments } = resolved.inspect_err(|_| record(Event::BadReference))?;
            let payload = PartsBuf::new(parts);
            let len = payload.remaining();
            let _span = tracing::trace_span!("shmgrpc_receive", len).entered();
            let msg = U::decode(payload);
            if segments.iter().any(|s| s.is_poisoned()) {
                record(Event::BadReference);
                return Err(Status::data_loss("the peer shrank a shared segment while the message was read"));
            }
            let msg =
                msg.map_err(|e| Status::invalid_argument(format!("message in shared memory does not decode: {e}")))?;
            record(Event::ShmReceived(len));
            return Ok(Some(msg));
        }
        let len = src.remaining();
        // The same status as for an undecodable message in shared memory: the peer sent bytes that are not the
        // message type (tonic's own codec says INTERNAL, which blames the receiver).
        let msg = U::decode(src).map_err(|e| Status::invalid_argument(format!("message does not decode: {e}")))?;
        // Counted for the process here; the channel's or server's count comes from its incoming body, which sees
        // the gRPC framing (the decoder has no context).
        stats::global(Event::InlineReceived(len));
        Ok(Some(msg))
    }
}

/// Turns reference bytes into the message parts they name, with the session it named (if it exists).
fn resolve(raw: &[u8]) -> (Option<Arc<Session>>, Result<Resolved, Status>) {
    let r = match wire::decode_reference(raw) {
        Ok(r) => r,
        Err(e) => return (None, Err(Status::invalid_argument(format!("bad shmgrpc reference: {e}")))),
    };
    // We are the other end of the session than the sender.
    let ours = Side::of_sender(r.from_server).peer();
    match Session::lookup(&r.session, ours) {
        Some(session) => {
            let resolved = session.resolve(r);
            (Some(session), resolved)
        }
        None => (None, Err(Status::failed_precondition("shmgrpc reference to an unknown or closed session"))),
    }
}
