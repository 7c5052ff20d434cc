//! Mappings: the read-write view an owner holds and the read-only view a peer holds, over either an `mmap` of a
//! descriptor (memfd, POSIX) or a System V attachment.

use std::io;

use memmap2::{Advice, Mmap, MmapMut};

use super::sysv::Attachment;

/// A read-write mapping of a segment we own.
pub(crate) enum MapRw {
    Mmap(MmapMut),
    SysV(Attachment),
}

/// A read-only mapping of a peer's segment.
pub(crate) enum MapRo {
    Mmap(Mmap),
    SysV(Attachment),
}

impl MapRw {
    pub(crate) fn len(&self) -> usize {
        match self {
            MapRw::Mmap(m) => m.len(),
            MapRw::SysV(a) => a.len(),
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            MapRw::Mmap(m) => m,
            MapRw::SysV(a) => a.as_slice(),
        }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            MapRw::Mmap(m) => m,
            MapRw::SysV(a) => a.as_mut_slice(),
        }
    }

    fn advise(&self, advice: rustix::mm::Advice) -> io::Result<()> {
        self.advise_prefix(self.as_slice().len(), advice)
    }

    /// `madvise` on the first `len` bytes (clamped to the mapping).
    fn advise_prefix(&self, len: usize, advice: rustix::mm::Advice) -> io::Result<()> {
        let s = self.as_slice();
        let len = len.min(s.len());
        // SAFETY: the range is a prefix of one live mapping owned by `self`; MADV_HUGEPAGE and MADV_POPULATE_WRITE
        // change neither its contents nor its validity.
        unsafe { rustix::mm::madvise(s.as_ptr() as *mut _, len, advice) }.map_err(io::Error::from)
    }

    /// Best effort: ask for transparent huge pages.
    pub(crate) fn advise_huge_pages(&self) {
        let r = match self {
            MapRw::Mmap(m) => m.advise(Advice::HugePage),
            MapRw::SysV(_) => self.advise(rustix::mm::Advice::LinuxHugepage),
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "MADV_HUGEPAGE refused; continuing with normal pages");
        }
    }

    /// Faults the pages of the first `len` bytes in, writable. Uses `MADV_POPULATE_WRITE` (Linux 5.14+), else
    /// touches each page.
    pub(crate) fn prefault(&mut self, len: usize) -> io::Result<()> {
        match self.advise_prefix(len, rustix::mm::Advice::LinuxPopulateWrite) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let page = super::page_size();
                let s = self.as_mut_slice();
                let len = len.min(s.len());
                let s = &mut s[..len];
                let mut i = 0;
                while i < s.len() {
                    // A volatile read-modify-write of an existing byte: forces a write fault without changing
                    // contents, and cannot be optimised away.
                    let p: *mut u8 = &mut s[i];
                    // SAFETY: `p` points into the live, writable slice `s`.
                    unsafe { p.write_volatile(p.read_volatile()) };
                    i += page;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl MapRo {
    pub(crate) fn len(&self) -> usize {
        match self {
            MapRo::Mmap(m) => m.len(),
            MapRo::SysV(a) => a.len(),
        }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            MapRo::Mmap(m) => m,
            MapRo::SysV(a) => a.as_slice(),
        }
    }
}
