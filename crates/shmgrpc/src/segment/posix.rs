//! The POSIX backend: `shm_open` under an unguessable name, `O_EXCL`, mode 0600, a shared `flock` held by the
//! creator while it lives (how `shmgrpc gc` tells a live creator from a dead one, whatever its pid namespace),
//! unlinked by the owner's drop.

use std::os::fd::{AsFd, OwnedFd};

use memmap2::MmapOptions;
use rustix::fs::Mode;
use rustix::shm;

use super::Backend::Posix;
use super::PosixName;
use super::map::{MapRo, MapRw};
use crate::error::{Error, Result};

/// The owner's hold on a POSIX segment: its name (unlinked on drop) and descriptor (which holds the liveness
/// lock).
pub(crate) struct Owned {
    name: PosixName,
    _fd: OwnedFd,
    /// The process that created the segment: a child it forked inherits this value but must not unlink the name,
    /// which the parent still uses.
    creator: u32,
}

impl Owned {
    pub(crate) fn name(&self) -> &PosixName {
        &self.name
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.creator != crate::pid::id() {
            return; // a forked child's copy: the name is the parent's
        }
        if let Err(e) = shm::unlink(self.name.as_str()) {
            tracing::warn!(error = %e, "shm_unlink of an owned POSIX segment failed");
        }
    }
}

pub(crate) fn create(len: usize) -> Result<(Owned, MapRw)> {
    let mode = Mode::RUSR | Mode::WUSR;
    // A collision of 64 random bits is not expected; retry a few times rather than ever reuse a name.
    let mut attempt = 0;
    let (name, fd) = loop {
        let name = PosixName::generate()?;
        match shm::open(name.as_str(), shm::OFlags::CREATE | shm::OFlags::EXCL | shm::OFlags::RDWR, mode) {
            Ok(fd) => break (name, fd),
            Err(rustix::io::Errno::EXIST) if attempt < 3 => attempt += 1,
            Err(e) => return Err(Error::os("shm_open", Posix, e)),
        }
    };
    // From here on the name exists: wrap it at once so every error path unlinks it.
    let owned = Owned { name, _fd: fd, creator: crate::pid::id() };
    let fd = owned._fd.as_fd();
    // Liveness every pid namespace can see: the creator holds a shared lock on the file for as long as it keeps the
    // descriptor, and the kernel drops it when the process dies. `shmgrpc gc` removes a segment only when it can
    // take the lock exclusively. Taken before the size is set, so a file of size 0 may be one being created.
    rustix::fs::flock(fd, rustix::fs::FlockOperation::LockShared).map_err(|e| Error::os("flock", Posix, e))?;
    // The umask can only remove bits, but be explicit: 0600 whatever the umask.
    rustix::fs::fchmod(fd, mode).map_err(|e| Error::os("fchmod", Posix, e))?;
    rustix::fs::ftruncate(fd, len as u64).map_err(|e| Error::os("ftruncate", Posix, e))?;
    // SAFETY: we created the file with O_EXCL and mode 0600 and only we truncate it; its size stays `len` for the
    // mapping's lifetime (a same-uid peer misbehaving could truncate it, which is why owners prefer memfd).
    let map = unsafe { MmapOptions::new().len(len).map_mut(&owned._fd) }.map_err(|e| Error::os("mmap", Posix, e))?;
    Ok((owned, MapRw::Mmap(map)))
}

/// Whether a process holds the creator's lock on the segment `name` (see the module docs): `Some(false)` when
/// nobody does (its creator is dead, whatever pid namespace it lived in), `None` when that cannot be told (the
/// segment cannot be opened, or it has size 0 and may be being created).
pub(crate) fn creator_lives(name: &PosixName) -> Option<bool> {
    let fd = shm::open(name.as_str(), shm::OFlags::RDONLY, Mode::empty()).ok()?;
    if rustix::fs::fstat(&fd).ok()?.st_size == 0 {
        return None;
    }
    match rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        // Nobody holds it; closing `fd` lets it go at once.
        Ok(()) => Some(false),
        Err(rustix::io::Errno::WOULDBLOCK) => Some(true),
        Err(_) => None,
    }
}

pub(crate) fn open(name: &PosixName, claimed_len: u64) -> Result<MapRo> {
    let fd =
        shm::open(name.as_str(), shm::OFlags::RDONLY, Mode::empty()).map_err(|e| Error::os("shm_open", Posix, e))?;
    let actual = super::memfd::real_size(fd.as_fd(), Posix)?;
    super::memfd::map_checked(&fd, claimed_len, actual, Posix)
}
