//! The memory limit of this process's cgroup, which the default pool budget stays under.
//!
//! memfd and `/dev/shm` pages are charged to the cgroup of the process that first touches them: a pool that fills
//! its budget inside a container with a memory limit below that budget gets the container OOM-killed. The limit
//! is cgroup v2's `memory.max` or v1's `memory.limit_in_bytes`, the smallest along the path from the process's
//! cgroup (`/proc/self/cgroup`) up to the root of the mounted hierarchy (`/proc/self/mountinfo`): a parent's limit
//! binds its children. Nothing here writes anything; a file that cannot be read means no limit is known.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// v1 reports "no limit" as a huge number (the largest page-aligned `i64`); anything from here up is no limit.
const V1_UNLIMITED: u64 = 1 << 60;

/// The memory limit of this process's cgroup in bytes, `None` when there is none (or none can be found). Read
/// once per process.
pub fn memory_limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let limit = memory_limit_under(Path::new("/"));
        tracing::debug!(?limit, "cgroup memory limit");
        limit
    })
}

/// [`memory_limit`], reading `proc/self/cgroup`, `proc/self/mountinfo` and the cgroup files under `root` (`/` for
/// the real ones; a fixture tree in tests).
pub(crate) fn memory_limit_under(root: &Path) -> Option<u64> {
    let cgroups = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
    let mountinfo = std::fs::read_to_string(root.join("proc/self/mountinfo")).ok()?;
    let mut limits = Vec::new();
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
        let (v2, file) = if controllers.is_empty() {
            (true, "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (false, "memory.limit_in_bytes")
        } else {
            continue;
        };
        let Some((mount_root, mount_point)) = find_mount(&mountinfo, v2) else { continue };
        let Some(dir) = cgroup_dir(path, &mount_root, &mount_point) else { continue };
        limits.extend(smallest_limit(&root.join(strip_root(&mount_point)), &root.join(strip_root(&dir)), file));
    }
    limits.into_iter().min()
}

/// The mount of the cgroup hierarchy (v2, or v1's memory controller): the hierarchy path it shows and where.
fn find_mount(mountinfo: &str, v2: bool) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let m: Vec<&str> = mount.split(' ').collect();
        let f: Vec<&str> = fs.split(' ').collect();
        let (root, point) = (m.get(3)?, m.get(4)?);
        let ours = if v2 {
            f.first() == Some(&"cgroup2")
        } else {
            f.first() == Some(&"cgroup") && f.get(2).is_some_and(|o| o.split(',').any(|o| o == "memory"))
        };
        ours.then(|| (PathBuf::from(unescape(root)), PathBuf::from(unescape(point))))
    })
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = b.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok());
        if b[i] == b'\\'
            && let Some(v) = code.and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where the cgroup `path` (as `/proc/self/cgroup` names it) is, given that the mount at `point` shows the
/// hierarchy from `root` down; `None` if the mount does not show it.
fn cgroup_dir(path: &str, root: &Path, point: &Path) -> Option<PathBuf> {
    let rel = Path::new(path).strip_prefix(root).ok()?;
    Some(point.join(rel))
}

fn strip_root(p: &Path) -> &Path {
    p.strip_prefix("/").unwrap_or(p)
}

/// The smallest limit in `file` from `dir` up to `top` (both included).
fn smallest_limit(top: &Path, dir: &Path, file: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut d = dir;
    loop {
        if let Some(l) = read_limit(&d.join(file)) {
            best = Some(best.map_or(l, |b| b.min(l)));
        }
        if d == top {
            break;
        }
        d = d.parent().filter(|p| p.starts_with(top))?;
    }
    best
}

/// A limit file's value: `max` (v2) or a huge number (v1) is no limit.
fn read_limit(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: u64 = text.trim().parse().ok()?;
    (v < V1_UNLIMITED).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture root: `proc/self/{cgroup,mountinfo}` and limit files.
    fn tree(cgroup: &str, mountinfo: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let w = |rel: &str, text: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        w("proc/self/cgroup", cgroup);
        w("proc/self/mountinfo", mountinfo);
        for (rel, text) in files {
            w(rel, text);
        }
        dir
    }

    const V2_MOUNT: &str = "24 30 0:22 / /proc rw - proc proc rw\n\
                            35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn cgroup_v2_limit_of_a_container_with_its_own_cgroup_namespace() {
        let t = tree("0::/\n", V2_MOUNT, &[("sys/fs/cgroup/memory.max", "536870912\n")]);
        assert_eq!(memory_limit_under(t.path()), Some(512 << 20));
    }

    #[test]
    fn cgroup_v2_without_a_limit() {
        let t =
            tree("0::/user.slice/app.scope\n", V2_MOUNT, &[("sys/fs/cgroup/user.slice/app.scope/memory.max", "max\n")]);
        assert_eq!(memory_limit_under(t.path()), None);
        let t = tree("0::/\n", V2_MOUNT, &[]);
        assert_eq!(memory_limit_under(t.path()), None, "the root cgroup has no memory.max");
    }

    #[test]
    fn cgroup_v2_nested_the_smallest_limit_on_the_way_up_binds() {
        let t = tree(
            "0::/kubepods/pod1/ctr\n",
            V2_MOUNT,
            &[
                ("sys/fs/cgroup/kubepods/memory.max", "8589934592\n"),
                ("sys/fs/cgroup/kubepods/pod1/memory.max", "536870912\n"),
                ("sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n"),
            ],
        );
        assert_eq!(memory_limit_under(t.path()), Some(512 << 20));
    }

    #[test]
    fn cgroup_v1_memory_controller_limit_and_no_limit() {
        let mountinfo = "40 30 0:35 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n\
                         41 30 0:36 /docker/abc /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu,cpuacct\n";
        let cgroup = "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n";
        let t = tree(cgroup, mountinfo, &[("sys/fs/cgroup/memory/memory.limit_in_bytes", "536870912\n")]);
        assert_eq!(memory_limit_under(t.path()), Some(512 << 20));
        let t = tree(cgroup, mountinfo, &[("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")]);
        assert_eq!(memory_limit_under(t.path()), None);
    }

    #[test]
    fn no_cgroup_files_no_limit() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(memory_limit_under(dir.path()), None);
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
    }
}
