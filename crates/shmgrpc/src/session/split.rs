//! `SplitBuf`: the encoder's buffer when slices of the message may already lie in shared memory. It writes like a
//! `Vec<u8>`, except that a large slice found in one of our loans or the peer's regions becomes a part of its own,
//! referred to where it is, and a large slice found nowhere is copied once into a pool buffer of its own.

use bytes::{Buf, BufMut};

use super::loan::Located;
use crate::pool::Lease;

/// Slices shorter than this are never looked up as loans or peer regions: a copy is cheaper.
const MIN_LOCATE: usize = 4096;

/// A slice at least this long that is not in shared memory yet is copied straight into a pool buffer of its own
/// (one copy), rather than into the inline bytes (which would need a second copy into shared memory).
const MIN_OWN: usize = 64 * 1024;

/// One piece of an encoded message.
pub(super) enum Piece {
    /// Bytes the encoder wrote.
    Inline(Vec<u8>),
    /// A slice that already lies in shared memory (one of our loans, or a region of the peer's).
    Shared(Located),
    /// A large slice copied into a pool buffer of its own.
    Owned(Lease),
}

/// A `BufMut` that writes like a `Vec<u8>`, except that a slice lying in shared memory this session can refer to
/// becomes a [`Piece::Shared`] instead of being copied.
pub(super) struct SplitBuf<'a> {
    /// Finds a slice in shared memory this session can refer to.
    locate: &'a dyn Fn(&[u8]) -> Option<Located>,
    /// A pool buffer for a large slice, if the pool has room.
    alloc: &'a dyn Fn(usize) -> Option<Lease>,
    current: Vec<u8>,
    pieces: Vec<Piece>,
}

impl<'a> SplitBuf<'a> {
    pub(super) fn new(
        locate: &'a dyn Fn(&[u8]) -> Option<Located>,
        alloc: &'a dyn Fn(usize) -> Option<Lease>,
        capacity: usize,
    ) -> Self {
        SplitBuf { locate, alloc, current: Vec::with_capacity(capacity), pieces: Vec::new() }
    }

    /// Takes `s` as a piece of its own if it is large: referred to where it is if it already lies in shared
    /// memory, else copied once into a pool buffer. False: the caller copies it into the inline bytes.
    fn try_share(&mut self, s: &[u8]) -> bool {
        if s.len() < MIN_LOCATE {
            return false;
        }
        let piece = match (self.locate)(s) {
            Some(loc) => Piece::Shared(loc),
            None if s.len() >= MIN_OWN => match (self.alloc)(s.len()) {
                Some(mut lease) => {
                    crate::copy::copy(&mut lease, s);
                    Piece::Owned(lease)
                }
                None => return false,
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
    pub(super) fn finish(mut self) -> Vec<Piece> {
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
