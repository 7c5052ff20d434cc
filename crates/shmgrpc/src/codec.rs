//! The transparent path: a tonic codec that sends large messages through shared memory.
//!
//! Use it as the `codec_path` of `tonic-prost-build` (`.codec_path("shmgrpc::ShmCodec")`); generated code then
//! creates it with `Default::default()` for every call, like tonic's own prost codec.
//!
//! *Encoding.* tonic gives a codec no connection context, and polls the encoder from the HTTP/2 connection's task.
//! The shmgrpc channel and server layer therefore wrap each call's outgoing body in a session body (`body.rs`),
//! which makes the call's session current on the thread for exactly the duration of each poll; the encoder, which
//! runs inside that poll, looks it up. A message whose encoded size reaches the session's threshold is encoded straight into a
//! pool buffer the peer holds until it releases it, and only a reference goes on the gRPC stream. Without a session (a plain channel
//! or server, a plain peer, a failed handshake), the codec is byte for byte tonic's prost codec.
//!
//! *Decoding.* A reference names its session (16 secret random bytes); the decoder resolves it through that session
//! only, to a segment the session's peer registered, with an overflow-checked range, and decodes the message from a
//! `Bytes` over the mapping: `bytes` fields (built with `.bytes(...)`) point into shared memory, zero-copy. The
//! buffer goes back to its owner when the last such `Bytes` is dropped. Anything wrong is a gRPC status. A
//! reference that overtook the registration of its segment never reaches the decoder early: the incoming body
//! wrapper holds it back until the registration is in (`body.rs`), so the decoder never waits.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

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
        let current = crate::body::current();
        let record = |event| match &current {
            Some(c) => c.recorder.record_both(event),
            None => stats::global(event),
        };
        if let Some(c) = &current
            && len >= c.threshold
        {
            let _span = tracing::trace_span!("shmgrpc_send", len).entered();
            let sent = match &c.session {
                None => Err(c.fallback),
                Some(_) if c.window_full => Err(Some(Fallback::WindowFull)),
                Some(session) => session.encode_to_shm(&item, len).map_err(Some),
            };
            match sent {
                Ok(reference) => {
                    wire::encode_reference(reference, dst);
                    record(Event::ShmSent(len));
                    self.last_inline.store(false, Ordering::Relaxed);
                    return Ok(());
                }
                Err(Some(reason)) => {
                    tracing::trace!(%reason, len, "sending inline");
                    record(Event::Fallback(reason));
                }
                Err(None) => {}
            }
        }
        item.encode(dst).map_err(|e| Status::internal(format!("encoding failed: {e}")))?;
        record(Event::InlineSent(len));
        self.last_inline.store(true, Ordering::Relaxed);
        Ok(())
    }
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
