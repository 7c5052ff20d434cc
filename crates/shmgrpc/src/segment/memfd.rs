//! The memfd backend: anonymous, sealed, shared by descriptor.

use std::os::fd::{AsFd, OwnedFd};

use memmap2::MmapOptions;
use rustix::fs::{MemfdFlags, SealFlags};

use super::Backend::Memfd;
use super::map::{MapRo, MapRw};
use crate::error::{Error, Result};

/// The seals a receiver insists on: without them the owner could shrink the file under a mapping (SIGBUS).
pub(crate) const REQUIRED_SEALS: SealFlags = SealFlags::SHRINK.union(SealFlags::GROW);

pub(crate) fn create(len: usize) -> Result<(OwnedFd, MapRw)> {
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_NOEXEC_SEAL (Linux 6.3+) keeps the file from ever being executable; older kernels refuse the flag.
    let fd = rustix::fs::memfd_create("shmgrpc", flags | MemfdFlags::NOEXEC_SEAL)
        .or_else(|_| rustix::fs::memfd_create("shmgrpc", flags))
        .map_err(|e| Error::os("memfd_create", Memfd, e))?;
    rustix::fs::ftruncate(&fd, len as u64).map_err(|e| Error::os("ftruncate", Memfd, e))?;
    // SAFETY: the memfd is new and private to us until shared; its size is fixed at `len` by the seals added below
    // (and nobody else has the fd yet), so the mapping can never be truncated under us.
    let map = unsafe { MmapOptions::new().len(len).map_mut(&fd) }.map_err(|e| Error::os("mmap", Memfd, e))?;
    // F_SEAL_FUTURE_WRITE (Linux 5.1+) forbids new writable mappings and write(2): our mapping, made above, stays
    // writable while every peer can only map read-only.
    let seals = REQUIRED_SEALS | SealFlags::SEAL;
    rustix::fs::fcntl_add_seals(&fd, seals | SealFlags::FUTURE_WRITE)
        .or_else(|_| rustix::fs::fcntl_add_seals(&fd, seals))
        .map_err(|e| Error::os("fcntl(F_ADD_SEALS)", Memfd, e))?;
    Ok((fd, MapRw::Mmap(map)))
}

pub(crate) fn open(fd: &OwnedFd, claimed_len: u64) -> Result<MapRo> {
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(|e| Error::os("fcntl(F_GET_SEALS)", Memfd, e))?;
    if !seals.contains(REQUIRED_SEALS) {
        return Err(Error::MissingSeals { present: seals.bits(), required: REQUIRED_SEALS.bits() });
    }
    let actual = real_size(fd.as_fd(), Memfd)?;
    map_checked(fd, claimed_len, actual, Memfd)
}

/// Size of a descriptor's file per `fstat`; refuses anything but a regular file.
pub(crate) fn real_size(fd: std::os::fd::BorrowedFd<'_>, backend: super::Backend) -> Result<u64> {
    let st = rustix::fs::fstat(fd).map_err(|e| Error::os("fstat", backend, e))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(Error::InvalidHandle("descriptor is not a regular shared-memory file"));
    }
    Ok(st.st_size as u64)
}

/// Maps the whole real size read-only after checking the claim against it.
pub(crate) fn map_checked(fd: &OwnedFd, claimed_len: u64, actual: u64, backend: super::Backend) -> Result<MapRo> {
    if claimed_len > actual {
        return Err(Error::SizeMismatch { backend, claimed: claimed_len, actual });
    }
    if actual == 0 {
        return Err(Error::InvalidHandle("segment is empty"));
    }
    let len = usize::try_from(actual).map_err(|_| Error::InvalidHandle("segment larger than the address space"))?;
    // SAFETY: the mapping is read-only and covers exactly the size the kernel reported. For memfd the seals
    // checked by the caller make that size permanent; a POSIX segment's owner could still truncate the file later,
    // which is why `PeerSegment::open` registers POSIX mappings with the SIGBUS guard (`guard.rs`).
    let map = unsafe { MmapOptions::new().len(len).map(fd) }.map_err(|e| Error::os("mmap", backend, e))?;
    Ok(MapRo::Mmap(map))
}
