//! Segments: one safe API over three kinds of shared memory.
//!
//! This module owns creating, sharing, opening and mapping shared memory. It knows nothing about pools or gRPC.
//!
//! * [`Backend::Memfd`] (default): an anonymous `memfd_create` file, sealed against shrinking and growing (and
//!   against new writable mappings, so a peer can only map it read-only). It has no name: the descriptor itself is
//!   handed to the peer (see [`crate::fdpass`]).
//! * [`Backend::Posix`]: `shm_open` with `O_EXCL` and mode 0600 whatever the umask, under an unguessable name
//!   `/shmgrpc-<pid>-<64 random bits>`; the owner unlinks it on drop.
//! * [`Backend::SysV`]: `shmget` with `IPC_PRIVATE` (or `ftok` + `IPC_EXCL` on request), mode 0600. Private
//!   segments are marked `IPC_RMID` as soon as their creator has attached them (Linux lets peers attach a marked
//!   segment by id), keyed ones as soon as the peer has attached; either way nothing outlives the processes.
//!
//! The owner holds a [`Segment`] (read-write). It gives a peer a [`SegmentHandle`] (a descriptor, a name or an id);
//! the peer turns it into a [`PeerSegment`] (read-only). Opening always checks the size the peer claims against
//! the kernel's own record (`fstat`, `IPC_STAT`), and every access is an overflow-checked range: a short segment is
//! an error, never a SIGBUS.

mod guard;
mod map;
mod memfd;
mod name;
mod posix;
mod sysv;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

pub use name::{POSIX_PREFIX, PosixName, SYSV_PROJ_ID};
pub(crate) use posix::creator_lives as posix_creator_lives;
pub use sysv::SysVId;

use crate::error::{Error, Result};
use map::{MapRo, MapRw};

/// Which kind of shared memory backs a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// `memfd_create`, sealed; shared by passing the descriptor. The default.
    #[default]
    Memfd,
    /// POSIX `shm_open`; shared by name.
    Posix,
    /// System V `shmget`; shared by id.
    SysV,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Memfd => "memfd",
            Backend::Posix => "posix",
            Backend::SysV => "sysv",
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "memfd" => Ok(Backend::Memfd),
            "posix" => Ok(Backend::Posix),
            "sysv" => Ok(Backend::SysV),
            _ => Err(Error::InvalidArgument(format!("unknown backend {s:?} (memfd, posix, sysv)"))),
        }
    }
}

/// How a System V segment gets its key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SysVKey {
    /// `IPC_PRIVATE`: no key at all; peers attach by id. The default.
    #[default]
    Private,
    /// The seed's way: a fresh key file is created in this directory, `ftok(file, SYSV_PROJ_ID)` gives the key,
    /// `shmget(key, IPC_CREAT | IPC_EXCL)` the segment, and the key file is removed again at once.
    Ftok(PathBuf),
}

/// Options for [`Segment::create`].
#[derive(Debug, Clone, Default)]
pub struct SegmentOptions {
    backend: Backend,
    sysv_key: SysVKey,
    prefault: bool,
    huge_pages: bool,
}

impl SegmentOptions {
    /// Options for `backend`, no prefaulting, no huge pages.
    pub fn new(backend: Backend) -> Self {
        SegmentOptions { backend, ..Default::default() }
    }
    /// Use `backend` instead.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }
    /// Fault every page in (writable) at creation, so the first real write does not pay for page faults.
    pub fn prefault(mut self, yes: bool) -> Self {
        self.prefault = yes;
        self
    }
    /// Ask for transparent huge pages (`madvise(MADV_HUGEPAGE)`); effective only where the kernel's shmem THP
    /// setting allows it.
    pub fn huge_pages(mut self, yes: bool) -> Self {
        self.huge_pages = yes;
        self
    }
    /// How a System V segment is keyed (ignored by the other backends).
    pub fn sysv_key(mut self, key: SysVKey) -> Self {
        self.sysv_key = key;
        self
    }
    /// The backend these options create.
    pub fn backend(&self) -> Backend {
        self.backend
    }
    /// Whether new segments are prefaulted.
    pub fn prefaults(&self) -> bool {
        self.prefault
    }
}

/// What a peer needs to open a segment. Produced by [`Segment::share`], consumed by [`PeerSegment::open`].
#[derive(Debug)]
pub enum SegmentHandle {
    /// A memfd descriptor (received with `SCM_RIGHTS`, or a clone of the owner's).
    Memfd(OwnedFd),
    /// A POSIX shared-memory name.
    Posix(PosixName),
    /// A System V segment id.
    SysV(SysVId),
}

impl SegmentHandle {
    /// The backend this handle refers to.
    pub fn backend(&self) -> Backend {
        match self {
            SegmentHandle::Memfd(_) => Backend::Memfd,
            SegmentHandle::Posix(_) => Backend::Posix,
            SegmentHandle::SysV(_) => Backend::SysV,
        }
    }
}

/// The backend-specific resource an owner holds; dropped after the mapping.
enum Owner {
    Memfd(OwnedFd),
    Posix(posix::Owned),
    SysV(sysv::Owned),
}

/// A shared-memory segment this process created: mapped read-write, removed from the system on drop.
pub struct Segment {
    // Field order matters: the mapping is dropped (munmap / shmdt) before the owner (close, unlink, IPC_RMID).
    map: MapRw,
    owner: Owner,
}

impl fmt::Debug for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Segment").field("backend", &self.backend()).field("len", &self.len()).finish()
    }
}

impl Segment {
    /// Creates a segment of exactly `len` bytes (zero-filled) and maps it read-write.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a length of 0; [`Error::Os`] when the kernel refuses (out of memory, limits
    /// such as `kernel.shmmax`, no `/dev/shm`); [`Error::Randomness`] when no name can be drawn.
    ///
    /// # Example
    ///
    /// ```
    /// use shmgrpc::{Backend, Segment, SegmentOptions};
    /// # fn main() -> shmgrpc::Result<()> {
    /// let mut seg = Segment::create(1 << 20, &SegmentOptions::new(Backend::Memfd))?;
    /// seg.as_mut_slice()[..5].copy_from_slice(b"hello");
    /// let handle = seg.share()?; // what a peer opens: here a sealed memfd
    /// # drop(handle);
    /// # Ok(()) }
    /// ```
    pub fn create(len: usize, opts: &SegmentOptions) -> Result<Segment> {
        if len == 0 {
            return Err(Error::InvalidArgument("a segment cannot be empty".into()));
        }
        if u64::try_from(len).is_err() || len > isize::MAX as usize {
            return Err(Error::InvalidArgument(format!("segment size {len} is too large")));
        }
        let (map, owner) = match opts.backend {
            Backend::Memfd => {
                let (fd, map) = memfd::create(len)?;
                (map, Owner::Memfd(fd))
            }
            Backend::Posix => {
                let (owned, map) = posix::create(len)?;
                (map, Owner::Posix(owned))
            }
            Backend::SysV => {
                let (owned, map) = sysv::create(len, &opts.sysv_key)?;
                (map, Owner::SysV(owned))
            }
        };
        let mut seg = Segment { map, owner };
        if opts.huge_pages {
            seg.map.advise_huge_pages();
        }
        if opts.prefault {
            seg.prefault(len)?;
        }
        tracing::trace!(backend = %opts.backend, len, "segment created");
        Ok(seg)
    }

    /// Faults in the pages of the first `len` bytes (clamped to the segment), writable, so that writing them
    /// later runs at memory speed instead of taking a page fault per page. Fresh shared memory costs the kernel
    /// about as much to populate as to fault in; doing it here moves the cost off the write (and prefaulting only
    /// what will be written avoids paying for the rest).
    ///
    /// # Errors
    ///
    /// [`Error::Os`] if `madvise(MADV_POPULATE_WRITE)` fails for another reason than being unsupported (then each
    /// page is touched instead), for example when memory runs out.
    pub fn prefault(&mut self, len: usize) -> Result<()> {
        let backend = self.backend();
        self.map.prefault(len).map_err(|e| Error::os("madvise(MADV_POPULATE_WRITE)", backend, e))
    }

    /// The backend of this segment.
    pub fn backend(&self) -> Backend {
        match self.owner {
            Owner::Memfd(_) => Backend::Memfd,
            Owner::Posix(_) => Backend::Posix,
            Owner::SysV(_) => Backend::SysV,
        }
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: segments are never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole segment, read-only.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_slice()
    }

    /// The whole segment, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_mut_slice()
    }

    /// A handle a peer can open: a new descriptor for memfd, the name for POSIX, the id for System V.
    ///
    /// A memfd handle is sealed against writes through new mappings, so the peer can only map it read-only.
    pub fn share(&self) -> Result<SegmentHandle> {
        Ok(match &self.owner {
            Owner::Memfd(fd) => SegmentHandle::Memfd(fd.try_clone().map_err(|e| Error::os("dup", Backend::Memfd, e))?),
            Owner::Posix(owned) => SegmentHandle::Posix(owned.name().clone()),
            Owner::SysV(owned) => SegmentHandle::SysV(owned.id()),
        })
    }

    /// The POSIX name, for backends that have one (shown by `shmgrpc ls`; never put it in an error).
    pub fn posix_name(&self) -> Option<&PosixName> {
        match &self.owner {
            Owner::Posix(owned) => Some(owned.name()),
            _ => None,
        }
    }
}

/// A peer's segment, mapped read-only after its size was checked against the kernel's record.
///
/// # The memory can change under you
///
/// The slices this type hands out ([`PeerSegment::as_slice`], [`PeerSegment::range`], and every `Bytes` the gRPC
/// layer builds over them) are memory the segment's owner, another process, can still write: our mapping is
/// read-only, theirs is not. Rust's `&[u8]` promises that the bytes do not change while borrowed; for shared memory
/// that promise holds only as far as the owner keeps it (memmap2 states the same hazard on its mappings of files
/// another process may modify). Nothing here can make the owner keep it, so:
///
/// - Reads never crash or read out of bounds: sizes are fixed and checked when the segment is opened, memfds are
///   sealed against shrinking, and a shrunk POSIX segment reads as zeros (see [`PeerSegment::is_poisoned`]).
/// - The *values* may change between two reads (time of check to time of use). Code that validates data and then
///   uses it must copy it first, or check it again (a checksum over what it used), if the owner is not trusted to
///   leave it alone. The protocol's owners do not write a buffer while the peer holds it, but a hostile owner can.
///
/// The same hazard is listed in `docs/security.md` (*Known limits*).
pub struct PeerSegment {
    // Field order matters: the SIGBUS guard is unregistered before the mapping goes.
    guard: Option<guard::Guard>,
    map: MapRo,
    backend: Backend,
    creator_pid: Option<u32>,
}

impl fmt::Debug for PeerSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSegment")
            .field("backend", &self.backend)
            .field("len", &self.len())
            .field("creator_pid", &self.creator_pid)
            .finish()
    }
}

impl PeerSegment {
    /// Opens and maps a peer's segment read-only.
    ///
    /// `claimed_len` is what the peer says the segment holds; it is checked against `fstat` / `IPC_STAT` and the
    /// whole real segment is mapped. A memfd must carry the shrink and grow seals (otherwise it could shrink while
    /// mapped and a read would raise SIGBUS).
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] when the segment is smaller than claimed, [`Error::MissingSeals`] for an unsealed
    /// memfd, [`Error::InvalidHandle`] for a handle that is not a shmgrpc segment, [`Error::Limit`] when too many
    /// unsealed (POSIX) peer segments are mapped, [`Error::Os`] when opening or mapping fails.
    ///
    /// # Example
    ///
    /// ```
    /// use shmgrpc::{Backend, PeerSegment, Segment, SegmentOptions};
    /// # fn main() -> shmgrpc::Result<()> {
    /// let mut seg = Segment::create(4096, &SegmentOptions::new(Backend::Posix))?;
    /// seg.as_mut_slice()[0] = 42;
    /// // In the peer (normally another process, given the handle):
    /// let peer = PeerSegment::open(seg.share()?, 4096)?;
    /// assert_eq!(peer.range(0, 1)?, &[42]);
    /// // A claim beyond the real size is refused, never mapped.
    /// assert!(PeerSegment::open(seg.share()?, 1 << 20).is_err());
    /// # Ok(()) }
    /// ```
    pub fn open(handle: SegmentHandle, claimed_len: u64) -> Result<PeerSegment> {
        Self::open_checked(handle, claimed_len, None)
    }

    /// Like [`PeerSegment::open`], but refuses, before mapping anything, a POSIX or System V segment that process
    /// `creator` did not create (per its name, or the kernel's `shm_cpid`). A memfd has no creator to check: it
    /// comes from whoever sent the descriptor.
    pub fn open_created_by(handle: SegmentHandle, claimed_len: u64, creator: u32) -> Result<PeerSegment> {
        Self::open_checked(handle, claimed_len, Some(creator))
    }

    fn open_checked(handle: SegmentHandle, claimed_len: u64, creator: Option<u32>) -> Result<PeerSegment> {
        let backend = handle.backend();
        let foreign = || Error::InvalidHandle("segment was not created by the expected process");
        let (map, creator_pid) = match handle {
            SegmentHandle::Memfd(fd) => (memfd::open(&fd, claimed_len)?, None),
            SegmentHandle::Posix(name) => {
                let pid = name.creator_pid();
                if creator.is_some_and(|c| c != pid) {
                    return Err(foreign());
                }
                (posix::open(&name, claimed_len)?, Some(pid))
            }
            SegmentHandle::SysV(id) => {
                let (map, cpid) = sysv::open(id, claimed_len, creator)?;
                (map, Some(cpid))
            }
        };
        // A POSIX segment cannot be sealed: guard reads against its owner shrinking it (see `guard`).
        let guard = match backend {
            Backend::Posix => Some(
                guard::protect(map.as_slice().as_ptr(), map.len())
                    .ok_or(Error::Limit("too many unsealed (POSIX) peer segments mapped at once"))?,
            ),
            _ => None,
        };
        Ok(PeerSegment { guard, map, backend, creator_pid })
    }

    /// The backend of this segment.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Real size of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: empty segments are refused at open.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The pid that created the segment, where the kernel or the name records it (POSIX, System V).
    pub fn creator_pid(&self) -> Option<u32> {
        self.creator_pid
    }

    /// Whether a read found the segment shrunk by its owner since it was mapped (possible only for POSIX
    /// segments, which cannot be sealed). The pages past the new end then read as zeros instead of raising SIGBUS.
    pub fn is_poisoned(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.poisoned())
    }

    /// The whole mapping.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_slice()
    }

    /// `len` bytes from `offset`, overflow-checked against the real size.
    pub fn range(&self, offset: u64, len: u64) -> Result<&[u8]> {
        let (start, end) = check_range(self.backend, offset, len, self.map.len())?;
        Ok(&self.map.as_slice()[start..end])
    }
}

/// Checks `offset + len <= size` without overflow and returns the range as `usize`s.
pub(crate) fn check_range(backend: Backend, offset: u64, len: u64, size: usize) -> Result<(usize, usize)> {
    let out = || Error::OutOfRange { backend, offset, len, size: size as u64 };
    let end = offset.checked_add(len).ok_or_else(out)?;
    if end > size as u64 {
        return Err(out());
    }
    // Both fit in usize because end <= size.
    Ok((offset as usize, end as usize))
}

/// The system page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_range_rejects_overflow_and_past_end() {
        assert_eq!(check_range(Backend::Memfd, 0, 10, 10).unwrap(), (0, 10));
        assert_eq!(check_range(Backend::Memfd, 10, 0, 10).unwrap(), (10, 10));
        assert!(check_range(Backend::Memfd, 1, 10, 10).is_err());
        assert!(check_range(Backend::Memfd, 11, 0, 10).is_err());
        assert!(check_range(Backend::Memfd, u64::MAX, 2, 10).is_err());
        assert!(check_range(Backend::Memfd, 2, u64::MAX, 10).is_err());
    }

    proptest::proptest! {
        #[test]
        fn check_range_matches_wide_arithmetic(offset: u64, len: u64, size in 0usize..1 << 40) {
            let ok = (offset as u128 + len as u128) <= size as u128;
            proptest::prop_assert_eq!(check_range(Backend::Posix, offset, len, size).is_ok(), ok);
        }
    }
}
