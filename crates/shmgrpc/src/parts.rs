//! Messages in pieces: encoding a message into parts (inline bytes, our shared regions, the peer's regions), and
//! decoding from a sequence of `Bytes` parts without copying fields that lie within one part.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::pool::Lease;
use crate::session::{Located, Session};

/// Slices shorter than this are never looked up as loans or peer regions: a copy is cheaper.
const MIN_LOCATE: usize = 4096;

/// A slice at least this long that is not in shared memory yet is copied straight into a pool buffer of its own
/// (one copy), rather than into the inline bytes (which would need a second copy into shared memory).
const MIN_OWN: usize = 64 * 1024;

/// One piece of an encoded message.
pub(crate) enum Piece {
    /// Bytes the encoder wrote.
    Inline(Vec<u8>),
    /// A slice that already lies in shared memory (one of our loans, or a region of the peer's).
    Shared(Located),
    /// A large slice copied into a pool buffer of its own.
    Owned(Lease),
}

/// A `BufMut` that writes like a `Vec<u8>`, except that a slice lying in shared memory this session can refer to
/// becomes a [`Piece::Shared`] instead of being copied.
pub(crate) struct SplitBuf<'a> {
    session: &'a Arc<Session>,
    current: Vec<u8>,
    pieces: Vec<Piece>,
}

impl<'a> SplitBuf<'a> {
    pub(crate) fn new(session: &'a Arc<Session>, capacity: usize) -> Self {
        SplitBuf { session, current: Vec::with_capacity(capacity), pieces: Vec::new() }
    }

    /// Takes `s` as a piece of its own if it is large: referred to where it is if it already lies in shared
    /// memory, else copied once into a pool buffer. False: the caller copies it into the inline bytes.
    fn try_share(&mut self, s: &[u8]) -> bool {
        if s.len() < MIN_LOCATE {
            return false;
        }
        let piece = match self.session.locate(s) {
            Some(loc) => Piece::Shared(loc),
            None if s.len() >= MIN_OWN => match self.session.alloc(s.len()) {
                Ok(mut lease) => {
                    lease.copy_from_slice(s);
                    Piece::Owned(lease)
                }
                Err(_) => return false,
            },
            None => return false,
        };
        if !self.current.is_empty() {
            self.pieces.push(Piece::Inline(std::mem::take(&mut self.current)));
        }
        self.pieces.push(piece);
        true
    }

    /// The pieces, in order.
    pub(crate) fn finish(mut self) -> Vec<Piece> {
        if !self.current.is_empty() {
            self.pieces.push(Piece::Inline(self.current));
        }
        self.pieces
    }
}

// SAFETY: every method delegates to the `Vec<u8>` being written, which upholds `BufMut`'s contract; the overridden
// `put` and `put_slice` only add whole bytes through `Vec`'s own safe methods.
unsafe impl BufMut for SplitBuf<'_> {
    fn remaining_mut(&self) -> usize {
        self.current.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: forwarded unchanged: the caller guarantees `cnt` bytes of `chunk_mut` were initialised.
        unsafe { self.current.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        self.current.chunk_mut()
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        let n = src.remaining();
        if src.chunk().len() == n && self.try_share(src.chunk()) {
            src.advance(n);
            return;
        }
        self.current.put(src);
    }

    fn put_slice(&mut self, src: &[u8]) {
        if !self.try_share(src) {
            self.current.extend_from_slice(src);
        }
    }
}

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
