//! Inventory: this machine's shmgrpc segments, for `shmgrpc ls` (our `ipcs`) and `shmgrpc gc` (our `ipcrm`).
//!
//! * POSIX segments are the files `/dev/shm/shmgrpc-<pid>-<random>`. Their creator holds a shared `flock` on the
//!   file while it lives; the kernel drops it when the process dies. That is how liveness is judged: a process in
//!   any pid namespace (a sidecar that shares `/dev/shm` but not the pid namespace) sees the same lock. The pid in
//!   the name is the creator's in its own pid namespace: information only.
//! * Keyed System V segments are those of `/proc/sysvipc/shm` whose key carries our `ftok` project byte
//!   ([`SYSV_PROJ_ID`]); the creator stays attached while it lives, so a segment with no attachment has lost it
//!   (the kernel's creator pid is information only). Private ones are marked for removal at creation, so they die
//!   with their processes and are never orphans.
//! * memfd segments have no name: they are listed from the descriptors processes hold (`/proc/<pid>/fd`) and die
//!   with the last holder, so `gc` never needs to touch them.
//!
//! `gc` removes a segment only when nothing shows that its creator lives (no lock, no attachment) and it belongs to
//! the caller's uid (root may remove any). A segment whose liveness cannot be told (one the caller cannot open, a
//! POSIX file of size 0, which may be one being created) counts as alive: `gc` never removes what may be in use.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::segment::{Backend, POSIX_PREFIX, PosixName, SYSV_PROJ_ID};

/// One segment found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Its backend.
    pub backend: Backend,
    /// POSIX: the name; System V: `key 0x.. id N`; memfd: `memfd (inode N)`.
    pub name: String,
    /// The creating process (POSIX, System V) or, for memfd, one process holding it.
    pub pid: Option<u32>,
    /// Whether its creator may be alive: POSIX, someone holds the creator's lock (or that cannot be told);
    /// System V, something is attached; memfd, always (a process holds it).
    pub alive: bool,
    /// Size in bytes.
    pub size: u64,
    /// Time since creation (POSIX: since the last change of its size; System V: since `ctime`).
    pub age: Option<Duration>,
    /// Owner uid.
    pub uid: u32,
    /// System V: processes attached.
    pub attached: Option<u64>,
}

/// Whether a process with this pid exists (in our pid namespace).
pub(crate) fn process_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(rustix::io::Errno::PERM) => true, // exists, owned by someone else
        Err(_) => false,
    }
}

fn age_since(secs: i64) -> Option<Duration> {
    let t = UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(secs).ok()?))?;
    SystemTime::now().duration_since(t).ok()
}

/// Lists every shmgrpc segment visible to the caller: POSIX, keyed System V, and memfds held by processes.
pub fn list() -> io::Result<Vec<SegmentInfo>> {
    let mut out = list_posix(Path::new("/dev/shm"))?;
    out.extend(list_sysv()?);
    out.extend(list_memfd());
    Ok(out)
}

fn list_posix(dir: &Path) -> io::Result<Vec<SegmentInfo>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(fname) = file_name.to_str() else {
            continue;
        };
        if !fname.starts_with(POSIX_PREFIX) {
            continue;
        }
        let Ok(name) = PosixName::parse(fname) else {
            continue;
        };
        let Ok(md) = entry.metadata() else { continue }; // removed meanwhile
        let pid = name.creator_pid();
        let alive = crate::segment::posix_creator_lives(&name).unwrap_or(true);
        out.push(SegmentInfo {
            backend: Backend::Posix,
            name: name.as_str().to_string(),
            pid: Some(pid),
            alive,
            size: md.len(),
            age: age_since(md.ctime()),
            uid: md.uid(),
            attached: None,
        });
    }
    Ok(out)
}

/// A row of `/proc/sysvipc/shm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SysVRow {
    key: i32,
    id: i32,
    size: u64,
    cpid: u32,
    nattch: u64,
    uid: u32,
    ctime: i64,
}

fn parse_sysv(text: &str) -> Vec<SysVRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 14 {
                return None;
            }
            Some(SysVRow {
                key: f[0].parse().ok()?,
                id: f[1].parse().ok()?,
                size: f[3].parse().ok()?,
                cpid: f[4].parse().ok()?,
                nattch: f[6].parse().ok()?,
                uid: f[7].parse().ok()?,
                ctime: f[13].parse().ok()?,
            })
        })
        .collect()
}

fn is_ours(key: i32) -> bool {
    key != 0 && (key as u32 >> 24) as u8 == SYSV_PROJ_ID
}

fn list_sysv() -> io::Result<Vec<SegmentInfo>> {
    let text = match std::fs::read_to_string("/proc/sysvipc/shm") {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(parse_sysv(&text)
        .into_iter()
        .filter(|r| is_ours(r.key))
        .map(|r| SegmentInfo {
            backend: Backend::SysV,
            name: format!("key {:#010x} id {}", r.key as u32, r.id),
            pid: Some(r.cpid),
            alive: r.nattch > 0,
            size: r.size,
            age: age_since(r.ctime),
            uid: r.uid,
            attached: Some(r.nattch),
        })
        .collect())
}

fn list_memfd() -> Vec<SegmentInfo> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if !target.to_string_lossy().starts_with("/memfd:shmgrpc") {
                continue;
            }
            let Ok(md) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if !seen.insert(md.ino()) {
                continue;
            }
            out.push(SegmentInfo {
                backend: Backend::Memfd,
                name: format!("memfd (inode {})", md.ino()),
                pid: Some(pid),
                alive: true,
                size: md.len(),
                age: age_since(md.ctime()),
                uid: md.uid(),
                attached: None,
            });
        }
    }
    out
}

/// Whether `gc` may remove this segment: an orphan of a dead creator that the caller owns (or the caller is root).
fn collectable(s: &SegmentInfo, my_uid: u32) -> bool {
    let owned = my_uid == 0 || s.uid == my_uid;
    match s.backend {
        Backend::Posix | Backend::SysV => !s.alive && owned,
        Backend::Memfd => false,
    }
}

/// Removes orphaned segments (see the module docs) and returns them; with `dry_run` only returns them.
pub fn gc(dry_run: bool) -> io::Result<Vec<SegmentInfo>> {
    let my_uid = rustix::process::getuid().as_raw();
    let mut removed = Vec::new();
    for s in list()?.into_iter().filter(|s| collectable(s, my_uid)) {
        if !dry_run {
            let r = match s.backend {
                Backend::Posix => rustix::shm::unlink(s.name.as_str()).map_err(io::Error::from),
                Backend::SysV => remove_sysv(&s),
                Backend::Memfd => continue,
            };
            match r {
                Ok(()) => {}
                // Gone meanwhile: the goal is reached.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL | libc::EIDRM)) => {}
                Err(e) => return Err(e),
            }
            tracing::info!(backend = %s.backend, size = s.size, "removed orphaned segment");
        }
        removed.push(s);
    }
    Ok(removed)
}

fn remove_sysv(s: &SegmentInfo) -> io::Result<()> {
    let id: i32 = s.name.rsplit(' ').next().and_then(|t| t.parse().ok()).ok_or_else(|| io::Error::other("bad id"))?;
    // SAFETY: IPC_RMID takes no buffer.
    if unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_sysvipc_shm() {
        let text = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                    1191249925          3   600              1048576  4242  4243      0     0     0     0     0 1700000000 1700000001 1700000002               1048576                     0\n\
                    0          4  1600                  4096     7     7      1  1000  1000  1000  1000          0          0 1700000003                     0                     0\n";
        let rows = parse_sysv(text);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            SysVRow { key: 1191249925, id: 3, size: 1048576, cpid: 4242, nattch: 0, uid: 0, ctime: 1700000002 }
        );
        assert!(is_ours(rows[0].key)); // 0x47... = 'G'
        assert!(!is_ours(rows[1].key));
        assert_eq!(rows[1].uid, 1000);
    }

    #[test]
    fn only_dead_owned_unattached_orphans_are_collectable() {
        let base = SegmentInfo {
            backend: Backend::Posix,
            name: String::new(),
            pid: Some(1),
            alive: false,
            size: 1,
            age: None,
            uid: 1000,
            attached: None,
        };
        assert!(collectable(&base, 1000));
        assert!(collectable(&base, 0));
        assert!(!collectable(&base, 1001));
        assert!(!collectable(&SegmentInfo { alive: true, ..base.clone() }, 1000));
        let sysv = SegmentInfo { backend: Backend::SysV, attached: Some(1), alive: true, ..base.clone() };
        assert!(!collectable(&sysv, 1000));
        assert!(collectable(&SegmentInfo { attached: Some(0), alive: false, ..sysv }, 1000));
        assert!(!collectable(&SegmentInfo { backend: Backend::Memfd, ..base }, 0));
    }
}
