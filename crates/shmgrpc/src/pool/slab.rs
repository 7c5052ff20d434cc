//! Slabs: one segment carved into equal slots for the small and middle size classes, so that many buffers share one
//! descriptor, one registration with each peer and one mapping on each side.
//!
//! A slot is owned by exactly one buffer for the slab's whole life: the pool carves each index once, and slots are
//! never handed back to the slab, only dropped with it (when every slot is idle). That is what makes the raw slot
//! slices below sound.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::segment::{Segment, SegmentHandle, SegmentOptions};

/// A segment of `slots` slots of `slot` bytes each.
pub(super) struct Slab {
    id: u32,
    /// Owns the mapping; never sliced after creation (slots are reached through `base`).
    segment: Segment,
    base: NonNull<u8>,
    slot: usize,
    slots: usize,
    /// Generations of every lease of any slot: (slab id, generation) names one lease.
    next_generation: AtomicU32,
    /// The tenant whose buffers its slots hold, once one took a slot (0: none yet); see `Pool::tenant`.
    tenant: AtomicU64,
}

// SAFETY: `base` points into the mapping owned by `segment`, which lives exactly as long as the slab and is never
// remapped. The slab itself only reads `base`; each slot range behind it is accessed only through the one `Slot`
// that owns it, which the pool hands to one buffer (and so one thread) at a time.
unsafe impl Send for Slab {}
// SAFETY: as for `Send`: shared references to a slab give access to nothing but its id, length, handle and atomic
// counter; slot memory is reached only through the owning `Slot`.
unsafe impl Sync for Slab {}

impl Slab {
    /// Creates a slab (nothing is prefaulted: each slot is populated when first carved).
    pub(super) fn create(id: u32, slot: usize, slots: usize, opts: &SegmentOptions) -> Result<Slab> {
        let len = slot
            .checked_mul(slots)
            .ok_or_else(|| Error::InvalidArgument(format!("slab of {slots} slots of {slot} bytes is too large")))?;
        let mut segment = Segment::create(len, &opts.clone().prefault(false))?;
        let base = NonNull::new(segment.as_mut_slice().as_mut_ptr()).expect("a mapping is never at address 0");
        Ok(Slab { id, segment, base, slot, slots, next_generation: AtomicU32::new(0), tenant: AtomicU64::new(0) })
    }

    pub(super) fn id(&self) -> u32 {
        self.id
    }

    pub(super) fn slots(&self) -> usize {
        self.slots
    }

    /// The whole segment's length (what a peer maps).
    pub(super) fn len(&self) -> usize {
        self.segment.len()
    }

    /// Address range of the whole segment.
    pub(super) fn range(&self) -> (usize, usize) {
        (self.base.as_ptr() as usize, self.len())
    }

    pub(super) fn share(&self) -> Result<SegmentHandle> {
        self.segment.share()
    }

    /// The tenant its slots belong to (0: none yet).
    pub(super) fn tenant(&self) -> u64 {
        self.tenant.load(Ordering::Acquire)
    }

    /// Gives the slab to `tenant` if it has none; whether it now belongs to `tenant`. (Called under the lock of
    /// the slab's class, which every binding of it takes.)
    pub(super) fn bind(&self, tenant: u64) -> bool {
        match self.tenant.compare_exchange(0, tenant, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(t) => t == tenant,
        }
    }

    pub(super) fn next_generation(&self) -> u32 {
        self.next_generation.fetch_add(1, Ordering::Relaxed)
    }
}

/// One slot of a slab, owned by exactly one buffer (see the module docs). Not `Clone`.
pub(super) struct Slot {
    slab: Arc<Slab>,
    index: usize,
}

impl Slot {
    /// Slot `index` of `slab`. The caller (the pool's carving, under its class lock) creates each index once.
    pub(super) fn carve(slab: Arc<Slab>, index: usize) -> Slot {
        assert!(index < slab.slots, "slot {index} of a slab of {}", slab.slots);
        Slot { slab, index }
    }

    pub(super) fn slab(&self) -> &Arc<Slab> {
        &self.slab
    }

    /// Offset of the slot in its segment.
    pub(super) fn offset(&self) -> usize {
        self.index * self.slab.slot
    }

    pub(super) fn len(&self) -> usize {
        self.slab.slot
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: `offset() + len() <= slots * slot`, the mapping's length, so the result stays inside it.
        unsafe { self.slab.base.as_ptr().add(self.offset()) }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: the range lies inside the live mapping (`ptr`), and this `Slot` is its only owner, so no `&mut`
        // to it exists while `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len()) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` makes this the only reference to the range.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len()) }
    }

    /// Faults in the pages of the slot's first `len` bytes, writable.
    pub(super) fn prefault(&mut self, len: usize) -> std::io::Result<()> {
        let len = len.min(self.len()).next_multiple_of(crate::segment::page_size()).min(self.len());
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range is page-aligned (slots are whole pages) and inside the live mapping; MADV_POPULATE_WRITE
        // changes neither its contents nor its validity.
        let r = unsafe { rustix::mm::madvise(self.ptr().cast(), len, rustix::mm::Advice::LinuxPopulateWrite) };
        match r {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::INVAL => {
                // Kernels before 5.14: touch each page.
                let page = crate::segment::page_size();
                let s = &mut self.as_mut_slice()[..len];
                for i in (0..s.len()).step_by(page) {
                    let p: *mut u8 = &mut s[i];
                    // SAFETY: `p` points into the live, writable slice `s`; a volatile read-modify-write of an existing
                    // byte forces a write fault without changing contents.
                    unsafe { p.write_volatile(p.read_volatile()) };
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}
