//! Decoding a message from its parts (a sequence of `Bytes`: inline bytes, the peer's regions, our own buffers)
//! without copying fields that lie within one part. Knows nothing of sessions.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::VecDeque;

/// A `Buf` over message parts. `copy_to_bytes` of a range inside one part is zero-copy (a slice of it).
pub(crate) struct PartsBuf {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl PartsBuf {
    pub(crate) fn new(parts: Vec<Bytes>) -> Self {
        let parts: VecDeque<Bytes> = parts.into_iter().filter(|b| !b.is_empty()).collect();
        let remaining = parts.iter().map(Bytes::len).sum();
        PartsBuf { parts, remaining }
    }
}

impl Buf for PartsBuf {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| b.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end");
        self.remaining -= cnt;
        while cnt > 0 {
            let front = self.parts.front_mut().expect("remaining counted it");
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.remaining, "copy_to_bytes past the end");
        if let Some(front) = self.parts.front_mut()
            && front.len() >= len
        {
            let out = front.split_to(len);
            if front.is_empty() {
                self.parts.pop_front();
            }
            self.remaining -= len;
            return out;
        }
        let mut out = BytesMut::with_capacity(len);
        out.put(self.take(len));
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_buf_reads_across_parts_and_slices_within_one() {
        let a = Bytes::from_static(b"hello ");
        let big = Bytes::from(vec![7u8; 10_000]);
        let c = Bytes::from_static(b" end");
        let mut buf = PartsBuf::new(vec![a, Bytes::new(), big.clone(), c]);
        assert_eq!(buf.remaining(), 6 + 10_000 + 4);
        assert_eq!(buf.copy_to_bytes(3), Bytes::from_static(b"hel"));
        let across = buf.copy_to_bytes(5); // "lo " + 2 bytes of big: copied
        assert_eq!(&across[..], b"lo \x07\x07");
        let inside = buf.copy_to_bytes(9_000);
        assert_eq!(inside.as_ptr(), big[2..].as_ptr(), "a range inside one part must be a slice of it");
        buf.advance(998);
        assert_eq!(buf.chunk(), b" end");
        buf.advance(4);
        assert_eq!(buf.remaining(), 0);
        assert_eq!(buf.chunk(), b"");
    }
}
