//! Wire formats: how a reference rides in a gRPC message, and how side-channel frames are framed.
//!
//! A message sent through shared memory is replaced, on the gRPC stream, by a message whose only field is number
//! [`REFERENCE_FIELD`] (19999), holding a [`Reference`]. Field numbers 19000-19999 are reserved by protobuf for its
//! implementations: `protoc` and protox refuse them in user schemas, so no genuine message can start with that tag,
//! and a receiver tells the two apart from the first bytes alone. Inline messages are byte for byte what plain
//! gRPC sends.
//!
//! Side-channel frames are a 4-byte little-endian length followed by a protobuf [`SideMessage`]; descriptors ride
//! with the frame's first byte (`SCM_RIGHTS`).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use prost::Message;

pub use crate::proto::v1::side_message::Kind;
pub use crate::proto::v1::{Reference, SideMessage};

/// The field number that marks a reference.
pub const REFERENCE_FIELD: u32 = 19999;

/// The first bytes of every reference: the key of field 19999 with wire type 2 (length-delimited), as a varint.
const REFERENCE_KEY: [u8; 3] = {
    let key = (REFERENCE_FIELD << 3) | 2; // 159994
    [(key as u8 & 0x7f) | 0x80, ((key >> 7) as u8 & 0x7f) | 0x80, (key >> 14) as u8]
};

pub use crate::protocol::{MAX_FRAME_LEN, MAX_REFERENCE_LEN};

/// Whether a received message is a reference (judged from its first bytes).
pub fn is_reference(first: &[u8]) -> bool {
    first.starts_with(&REFERENCE_KEY)
}

/// The reference as the bytes of a gRPC message.
#[derive(Clone, PartialEq, prost::Message)]
struct Envelope {
    #[prost(message, optional, tag = "19999")]
    reference: Option<Reference>,
}

/// Encodes `r` as a gRPC message body.
pub fn encode_reference(r: Reference, dst: &mut impl bytes::BufMut) {
    Envelope { reference: Some(r) }.encode(dst).expect("references are small and the buffer grows");
}

/// Decodes a message that [`is_reference`] recognised. Anything but exactly one well-formed reference is refused.
pub fn decode_reference(src: &[u8]) -> Result<Reference, &'static str> {
    if src.len() > MAX_REFERENCE_LEN {
        return Err("reference too long");
    }
    if !is_reference(src) {
        return Err("not a reference");
    }
    let env = Envelope::decode(src).map_err(|_| "malformed reference")?;
    // Exactly one field and nothing else: re-encoding must give back as many bytes.
    if env.encoded_len() != src.len() {
        return Err("reference carries extra fields");
    }
    env.reference.ok_or("empty reference")
}

/// Appends one side-channel frame (length, then message) to `buf`.
pub fn encode_frame(msg: &SideMessage, buf: &mut Vec<u8>) {
    let len = msg.encoded_len();
    buf.reserve(4 + len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    msg.encode(buf).expect("Vec grows");
}

/// Writes one side-channel frame, with `fd` attached if given.
pub fn write_frame(sock: &UnixStream, msg: &SideMessage, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf);
    let sent = match fd {
        Some(fd) => crate::fdpass::send_with_fds(sock.as_fd(), &buf, &[fd])?,
        None => 0,
    };
    (&*sock).write_all(&buf[sent..])
}

/// Reads one side-channel frame and the descriptors that came with it. `Ok(None)` at a clean end of stream.
pub fn read_frame(sock: &UnixStream) -> io::Result<Option<(SideMessage, Vec<OwnedFd>)>> {
    let mut head = [0u8; 4];
    let mut fds = Vec::new();
    // The descriptors arrive with the first byte: read the header with recvmsg.
    let mut got = 0;
    while got < 4 {
        let (n, mut f) = crate::fdpass::recv_with_fds(sock.as_fd(), &mut head[got..])?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "side channel closed mid-frame"));
        }
        fds.append(&mut f);
        got += n;
    }
    let len = u32::from_le_bytes(head) as usize;
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "side-channel frame too long"));
    }
    let mut body = vec![0u8; len];
    (&*sock).read_exact(&mut body)?;
    let msg = decode_frame(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((msg, fds)))
}

/// Decodes the body of a side-channel frame (after its length): a `SideMessage` with its kind set.
pub fn decode_frame(body: &[u8]) -> Result<SideMessage, &'static str> {
    if body.len() > MAX_FRAME_LEN {
        return Err("side-channel frame too long");
    }
    let msg = SideMessage::decode(body).map_err(|_| "malformed side-channel frame")?;
    if msg.kind.is_none() {
        return Err("side-channel frame without a kind");
    }
    Ok(msg)
}

/// Wraps a kind into a frame.
pub fn frame(kind: Kind) -> SideMessage {
    SideMessage { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::proto::v1::{Part, Region, part};

    fn sample() -> Reference {
        let region = Region { segment: 3, generation: 9, offset: 0, len: 20 << 20 };
        Reference {
            session: vec![7; 16].into(),
            from_server: true,
            parts: vec![Part { kind: Some(part::Kind::Sender(region)) }],
        }
    }

    #[test]
    fn references_round_trip_and_are_recognised() {
        let mut buf = Vec::new();
        encode_reference(sample(), &mut buf);
        assert!(is_reference(&buf));
        assert_eq!(decode_reference(&buf).unwrap(), sample());
    }

    #[test]
    fn ordinary_messages_are_not_references() {
        // The demo service's payload message, as an ordinary application message.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Payload {
            #[prost(bytes = "vec", tag = "1")]
            data: Vec<u8>,
            #[prost(uint32, tag = "2")]
            crc32: u32,
            #[prost(string, tag = "3")]
            note: String,
        }
        let p = Payload { data: vec![1; 100], crc32: 5, note: "x".into() };
        assert!(!is_reference(&p.encode_to_vec()));
        assert!(!is_reference(&[]));
        assert!(decode_reference(&p.encode_to_vec()).is_err());
    }

    #[test]
    fn trailing_fields_are_refused() {
        let mut buf = Vec::new();
        encode_reference(sample(), &mut buf);
        buf.extend_from_slice(&[0x08, 0x01]); // field 1 varint 1
        assert!(decode_reference(&buf).is_err());
    }

    proptest! {
        #[test]
        fn decode_frame_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = decode_frame(&bytes) {
                prop_assert!(m.kind.is_some());
            }
        }

        #[test]
        fn decode_reference_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_reference(&bytes);
            let mut with_key = REFERENCE_KEY.to_vec();
            with_key.extend_from_slice(&bytes);
            let _ = decode_reference(&with_key);
        }

        #[test]
        fn any_reference_round_trips(session in proptest::collection::vec(any::<u8>(), 0..32), segment: u32,
                                     generation: u32, offset: u64, len: u64, from_server: bool,
                                     inline in proptest::collection::vec(any::<u8>(), 0..64)) {
            let region = Region { segment, generation, offset, len };
            let parts = vec![
                Part { kind: Some(part::Kind::Inline(inline.into())) },
                Part { kind: Some(part::Kind::Sender(region)) },
                Part { kind: Some(part::Kind::Receiver(region)) },
            ];
            let r = Reference { session: session.into(), from_server, parts };
            let mut buf = Vec::new();
            encode_reference(r.clone(), &mut buf);
            prop_assert_eq!(decode_reference(&buf).unwrap(), r);
        }
    }
}
