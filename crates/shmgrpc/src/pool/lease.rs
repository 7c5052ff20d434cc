//! A pool buffer and its lease: [`Lease`] is exclusive use of one buffer, which goes back to its pool (a
//! *return*) when the lease is dropped.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::time::Instant;

use super::Pool;
use super::slab::Slot;
use crate::error::{Error, Result};
use crate::segment::{Segment, SegmentHandle};

/// A buffer of the pool: its memory plus its identity. `id` names the segment (its own, or its slab), and
/// `(id, generation)` names one lease of it.
pub(super) struct Buffer {
    pub(super) id: u32,
    pub(super) generation: u32,
    pub(super) storage: Storage,
    /// When it last became idle (or was created).
    pub(super) idle_since: Instant,
    /// Made by `Pool::preallocate`: part of the pool's floor, never dropped for being idle.
    pub(super) preallocated: bool,
    /// The tenant of a segment of its own (0: none yet); a slot's is its slab's.
    tenant: u64,
}

pub(super) enum Storage {
    /// A segment of its own.
    Own(Segment),
    /// A slot of a slab.
    Slot(Slot),
}

impl Buffer {
    pub(super) fn new(id: u32, generation: u32, storage: Storage) -> Buffer {
        Buffer { id, generation, storage, idle_since: Instant::now(), preallocated: false, tenant: 0 }
    }

    /// The tenant whose messages the buffer's segment has held (0: none yet): see `Pool::tenant`.
    pub(super) fn tenant(&self) -> u64 {
        match &self.storage {
            Storage::Own(_) => self.tenant,
            Storage::Slot(s) => s.slab().tenant(),
        }
    }

    /// Whether a lease for `tenant` may take this buffer: one of its own segments, or one no tenant had; a caller
    /// without a tenant (0) takes only the latter.
    pub(super) fn fits_tenant(&self, tenant: u64) -> bool {
        let t = self.tenant();
        t == 0 || t == tenant
    }

    /// Gives the buffer's segment to `tenant` (nothing for 0); whether it belongs to it now.
    pub(super) fn bind(&mut self, tenant: u64) -> bool {
        if tenant == 0 {
            return self.tenant() == 0;
        }
        match &self.storage {
            Storage::Own(_) if self.tenant == 0 || self.tenant == tenant => {
                self.tenant = tenant;
                true
            }
            Storage::Own(_) => false,
            Storage::Slot(s) => s.slab().bind(tenant),
        }
    }

    pub(super) fn capacity(&self) -> usize {
        match &self.storage {
            Storage::Own(s) => s.len(),
            Storage::Slot(s) => s.len(),
        }
    }

    pub(super) fn offset(&self) -> usize {
        match &self.storage {
            Storage::Own(_) => 0,
            Storage::Slot(s) => s.offset(),
        }
    }

    pub(super) fn segment_len(&self) -> usize {
        match &self.storage {
            Storage::Own(s) => s.len(),
            Storage::Slot(s) => s.slab().len(),
        }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        match &self.storage {
            Storage::Own(s) => s.as_slice(),
            Storage::Slot(s) => s.as_slice(),
        }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Own(s) => s.as_mut_slice(),
            Storage::Slot(s) => s.as_mut_slice(),
        }
    }

    pub(super) fn share(&self) -> Result<SegmentHandle> {
        match &self.storage {
            Storage::Own(s) => s.share(),
            Storage::Slot(s) => s.slab().share(),
        }
    }

    /// A new generation for the next lease: per buffer for a segment of its own, per slab for a slot (two slots
    /// of one slab share the segment id, so their generations must differ).
    pub(super) fn renew(&mut self) {
        self.generation = match &self.storage {
            Storage::Own(_) => self.generation.wrapping_add(1),
            Storage::Slot(s) => s.slab().next_generation(),
        };
    }
}

/// Exclusive use of one pool buffer. Derefs to its first `len()` bytes; returns to the pool when dropped.
pub struct Lease {
    buffer: Option<Buffer>,
    class: usize,
    len: usize,
    pool: Pool,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id())
            .field("generation", &self.generation())
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl Lease {
    pub(super) fn new(buffer: Buffer, class: usize, len: usize, pool: Pool) -> Lease {
        Lease { buffer: Some(buffer), class, len, pool }
    }

    fn buf(&self) -> &Buffer {
        self.buffer.as_ref().expect("a live lease holds its buffer")
    }

    /// The id of the buffer's segment, unique within its pool (buffers carved out of one slab share it).
    pub fn id(&self) -> u32 {
        self.buf().id
    }

    /// The lease's generation: `(id, generation)` names this lease and no other, past or future (until the 32-bit
    /// counter wraps).
    pub fn generation(&self) -> u32 {
        self.buf().generation
    }

    /// Bytes in use (what was asked for, or set by [`Lease::set_len`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `len()` is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the underlying buffer.
    pub fn capacity(&self) -> usize {
        self.buf().capacity()
    }

    /// Offset of the buffer in its segment (0 unless it is a slot of a slab).
    pub fn offset(&self) -> usize {
        self.buf().offset()
    }

    /// Length of the buffer's whole segment: what a peer maps when it opens [`Lease::share`]'s handle.
    pub fn segment_len(&self) -> usize {
        self.buf().segment_len()
    }

    /// Changes the length within the capacity.
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity() {
            return Err(Error::InvalidArgument(format!(
                "length {len} exceeds the buffer's capacity {}",
                self.capacity()
            )));
        }
        self.len = len;
        Ok(())
    }

    /// The whole buffer, up to its capacity.
    pub fn as_capacity_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut().expect("a live lease holds its buffer").as_mut_slice()
    }

    /// A handle on the buffer's whole segment that a peer can open (see [`Segment::share`]); the buffer lies at
    /// [`Lease::offset`] in it.
    pub fn share(&self) -> Result<SegmentHandle> {
        self.buf().share()
    }
}

impl Deref for Lease {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf().as_slice()[..self.len]
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.as_capacity_mut()[..len]
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.put_back(self.class, buffer);
        }
    }
}
