//! The System V backend: `shmget` / `shmat` / `shmdt` / `shmctl`, mode 0600, removed as early as Linux allows.
//!
//! libc is used directly because rustix does not wrap System V IPC; every call is confined to this file.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::Backend::SysV;
use super::map::{MapRo, MapRw};
use super::{SYSV_PROJ_ID, SysVKey};
use crate::error::{Error, Result};

/// A System V shared-memory id, as `shmget` returns it and `ipcs -m` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SysVId(i32);

impl SysVId {
    /// Wraps an id received from a peer. Opening it still goes through every check of [`super::PeerSegment::open`].
    pub fn from_raw(id: i32) -> SysVId {
        SysVId(id)
    }
    /// The numeric id.
    pub fn as_raw(self) -> i32 {
        self.0
    }
}

/// A `shmat` attachment, detached on drop.
pub(crate) struct Attachment {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the attachment is plain memory owned by this value; access goes through `&self` / `&mut self` slices,
// so Rust's aliasing rules apply as for a `Vec<u8>`.
unsafe impl Send for Attachment {}
// SAFETY: as above; `&Attachment` only gives out `&[u8]`.
unsafe impl Sync for Attachment {}

impl Attachment {
    fn attach(id: SysVId, len: usize, writable: bool) -> io::Result<Attachment> {
        let flags = if writable { 0 } else { libc::SHM_RDONLY };
        // SAFETY: shmat with a null address lets the kernel choose a free range; it does not touch our memory.
        let p = unsafe { libc::shmat(id.0, std::ptr::null(), flags) };
        if p as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("shmat returned null"))?;
        Ok(Attachment { ptr, len, writable })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live attachment of at least `len` bytes (`len` is the kernel's `shm_segsz`, and a
        // System V segment can never shrink); it stays mapped until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.writable, "read-only System V attachment used for writing");
        // SAFETY: as in `as_slice`, and the attachment is writable; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from shmat and is detached exactly once; no slice borrowed from `self` outlives it.
        if unsafe { libc::shmdt(self.ptr.as_ptr().cast()) } != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "shmdt failed");
        }
    }
}

/// The owner's hold on a System V segment: `IPC_RMID` on drop unless already marked.
pub(crate) struct Owned {
    id: SysVId,
}

impl Owned {
    pub(crate) fn id(&self) -> SysVId {
        self.id
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // Marking twice is harmless; a segment already gone (EINVAL, EIDRM) is what we want anyway.
        let _ = remove(self.id);
    }
}

/// `shmctl(IPC_RMID)`: the segment disappears once the last attachment is gone.
fn remove(id: SysVId) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    if unsafe { libc::shmctl(id.0, libc::IPC_RMID, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What `IPC_STAT` tells about a segment.
pub(crate) struct Stat {
    pub(crate) key: i32,
    pub(crate) size: u64,
    pub(crate) cpid: u32,
}

pub(crate) fn stat(id: SysVId) -> io::Result<Stat> {
    let mut ds = MaybeUninit::<libc::shmid_ds>::zeroed();
    // SAFETY: `ds` is a properly sized, writable shmid_ds; IPC_STAT fills it on success.
    if unsafe { libc::shmctl(id.0, libc::IPC_STAT, ds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: shmctl succeeded, so the kernel wrote the structure (and it was zeroed before anyway).
    let ds = unsafe { ds.assume_init() };
    Ok(Stat { key: ds.shm_perm.__key, size: ds.shm_segsz as u64, cpid: ds.shm_cpid as u32 })
}

/// Removes the key file when dropped: the seed left it behind; we never do.
struct KeyFile(PathBuf);
impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn ftok_key(dir: &Path) -> Result<(KeyFile, libc::key_t)> {
    let mut rand = [0u8; 8];
    getrandom::fill(&mut rand).map_err(Error::randomness("a System V key"))?;
    let path = dir.join(format!("shmgrpc-{}-{:016x}.key", crate::pid::id(), u64::from_le_bytes(rand)));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Error::os("create ftok key file", SysV, e))?;
    let file = KeyFile(path);
    let c = CString::new(file.0.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument("ftok directory path contains a NUL byte".into()))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let key = unsafe { libc::ftok(c.as_ptr(), SYSV_PROJ_ID as libc::c_int) };
    if key == -1 {
        return Err(Error::os("ftok", SysV, io::Error::last_os_error()));
    }
    Ok((file, key))
}

pub(crate) fn create(len: usize, key: &SysVKey) -> Result<(Owned, MapRw)> {
    // Key files that collided stay until we are done, so the next file gets another inode (and so another key):
    // ftok keeps only 16 bits of the inode, and a just-deleted file's inode is the first to be reused.
    let mut tried: Vec<KeyFile> = Vec::new();
    let id = loop {
        let (file, k) = match key {
            SysVKey::Private => (None, libc::IPC_PRIVATE),
            SysVKey::Ftok(dir) => {
                let (f, k) = ftok_key(dir)?;
                (Some(f), k)
            }
        };
        // SAFETY: shmget takes plain integers.
        let id = unsafe { libc::shmget(k, len, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
        if id >= 0 {
            break SysVId(id);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) && k != libc::IPC_PRIVATE && tried.len() < 64 {
            tried.extend(file);
            continue;
        }
        return Err(Error::os("shmget", SysV, err));
    };
    drop(tried); // every key file is removed again
    let owned = Owned { id };
    let att = Attachment::attach(id, len, true).map_err(|e| Error::os("shmat", SysV, e))?;
    if matches!(key, SysVKey::Private) {
        // Linux lets peers attach a segment marked for removal by id while it is still attached, so a private
        // segment can be marked now: it can never outlive the processes using it.
        remove(id).map_err(|e| Error::os("shmctl(IPC_RMID)", SysV, e))?;
    }
    Ok((owned, MapRw::SysV(att)))
}

pub(crate) fn open(id: SysVId, claimed_len: u64, creator: Option<u32>) -> Result<(MapRo, u32)> {
    let st = stat(id).map_err(|e| Error::os("shmctl(IPC_STAT)", SysV, e))?;
    if creator.is_some_and(|c| c != st.cpid) {
        return Err(Error::InvalidHandle("segment was not created by the expected process"));
    }
    if claimed_len > st.size {
        return Err(Error::SizeMismatch { backend: SysV, claimed: claimed_len, actual: st.size });
    }
    if st.size == 0 {
        return Err(Error::InvalidHandle("segment is empty"));
    }
    let len = usize::try_from(st.size).map_err(|_| Error::InvalidHandle("segment larger than the address space"))?;
    let att = Attachment::attach(id, len, false).map_err(|e| Error::os("shmat", SysV, e))?;
    if st.key != libc::IPC_PRIVATE {
        // A keyed segment: the peer (us) has attached, so mark it now; nothing is left behind if both die.
        if let Err(e) = remove(id) {
            tracing::debug!(error = %e, "could not mark a keyed System V segment for removal after attaching");
        }
    }
    Ok((MapRo::SysV(att), st.cpid))
}
