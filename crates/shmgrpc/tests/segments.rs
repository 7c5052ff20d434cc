//! Segments across real processes: share, open, read; refusals instead of SIGBUS; permissions; orphans and `gc`.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::{Child, crc, fill, posix_exists, sysv_exists};
use shmgrpc::segment::{PosixName, SysVId, SysVKey};
use shmgrpc::{Backend, Error, PeerSegment, Segment, SegmentHandle, SegmentOptions};

/// Entry point of the child processes the other tests start (see `common`). Does nothing when run directly.
#[test]
#[ignore = "child process entry point, started by the other tests"]
fn child_main() {
    let Ok(role) = std::env::var(common::ROLE) else { return };
    let sock = common::child_socket();
    match role.as_str() {
        "reader" => reader(&sock),
        "holder" => holder(&sock),
        "umask0" => umask0(&sock),
        other => panic!("unknown role {other}"),
    }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::SizeMismatch { .. } => "size",
        Error::MissingSeals { .. } => "seals",
        Error::OutOfRange { .. } => "range",
        Error::InvalidHandle(_) => "handle",
        Error::Os { .. } => "os",
        _ => "other",
    }
}

/// Opens what the parent sends and answers with a checksum of the claimed range, or the kind of error.
/// Requests: `open <backend> <claimed> <name|id|->` (memfd travels as a descriptor), `mapw` (try a writable
/// mapping of the memfd sent along), `quit`.
fn reader(sock: &std::os::unix::net::UnixStream) {
    loop {
        let (line, mut fds) = common::recv(sock);
        let words: Vec<&str> = line.split(' ').collect();
        let reply = match words[0] {
            "open" => {
                let claimed: u64 = words[2].parse().unwrap();
                let handle = match words[1] {
                    "memfd" => SegmentHandle::Memfd(fds.pop().expect("memfd sent along")),
                    "posix" => SegmentHandle::Posix(PosixName::parse(words[3]).unwrap()),
                    "sysv" => SegmentHandle::SysV(SysVId::from_raw(words[3].parse().unwrap())),
                    b => panic!("backend {b}"),
                };
                match PeerSegment::open(handle, claimed) {
                    Ok(seg) => format!("ok {}", crc(seg.range(0, claimed).unwrap())),
                    Err(e) => format!("err {}", kind(&e)),
                }
            }
            "mapw" => {
                let fd = fds.pop().expect("memfd sent along");
                // SAFETY: a test probe; if the mapping succeeded it would be dropped at once without access.
                let r = unsafe { memmap2::MmapOptions::new().len(4096).map_mut(&fd) };
                let w = rustix::io::write(&fd, b"x");
                match (r, w) {
                    (Err(_), Err(_)) => "denied".to_string(),
                    _ => "allowed".to_string(),
                }
            }
            "quit" | "" => return,
            other => panic!("request {other}"),
        };
        common::send(sock, &reply, &[]);
    }
}

/// Creates a POSIX and a keyed System V segment, reports them, and waits to be killed.
fn holder(sock: &std::os::unix::net::UnixStream) {
    let keydir = std::env::var("KEYDIR").unwrap();
    let p = Segment::create(1 << 20, &SegmentOptions::new(Backend::Posix)).unwrap();
    let s =
        Segment::create(1 << 20, &SegmentOptions::new(Backend::SysV).sysv_key(SysVKey::Ftok(keydir.into()))).unwrap();
    let SegmentHandle::SysV(id) = s.share().unwrap() else { unreachable!() };
    common::send(sock, &format!("held {} {}", p.posix_name().unwrap().as_str(), id.as_raw()), &[]);
    std::thread::sleep(Duration::from_secs(600));
}

/// Creates segments under umask 0 and reports their modes.
fn umask0(sock: &std::os::unix::net::UnixStream) {
    rustix::process::umask(rustix::fs::Mode::empty());
    let p = Segment::create(4096, &SegmentOptions::new(Backend::Posix)).unwrap();
    let md = std::fs::metadata(format!("/dev/shm{}", p.posix_name().unwrap().as_str())).unwrap();
    let s = Segment::create(4096, &SegmentOptions::new(Backend::SysV)).unwrap();
    let SegmentHandle::SysV(id) = s.share().unwrap() else { unreachable!() };
    let perms = std::fs::read_to_string("/proc/sysvipc/shm")
        .unwrap()
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(&id.as_raw().to_string()))
        .map(|l| l.split_whitespace().nth(2).unwrap().to_string())
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    common::send(sock, &format!("modes {:o} {perms}", md.permissions().mode() & 0o7777), &[]);
}

/// Sends `seg` to the reader with a claimed length; returns the reply.
fn open_in_child(child: &Child, seg: &Segment, claimed: u64) -> String {
    match seg.share().unwrap() {
        SegmentHandle::Memfd(fd) => child.ask(&format!("open memfd {claimed} -"), &[fd.as_fd()]),
        SegmentHandle::Posix(n) => child.ask(&format!("open posix {claimed} {}", n.as_str()), &[]),
        SegmentHandle::SysV(id) => child.ask(&format!("open sysv {claimed} {}", id.as_raw()), &[]),
    }
}

fn all_backends() -> Vec<(&'static str, SegmentOptions)> {
    let keydir = std::env::temp_dir();
    vec![
        ("memfd", SegmentOptions::new(Backend::Memfd)),
        ("posix", SegmentOptions::new(Backend::Posix)),
        ("sysv private", SegmentOptions::new(Backend::SysV)),
        ("sysv ftok", SegmentOptions::new(Backend::SysV).sysv_key(SysVKey::Ftok(keydir))),
        ("memfd prefaulted", SegmentOptions::new(Backend::Memfd).prefault(true).huge_pages(true)),
    ]
}

#[test]
fn each_backend_is_created_shared_opened_and_read_across_processes() {
    let child = Child::spawn("reader");
    for (name, opts) in all_backends() {
        let len = (4 << 20) + 123;
        let mut seg = Segment::create(len, &opts).unwrap();
        assert_eq!(seg.len(), len);
        assert!(seg.as_slice().iter().all(|&b| b == 0), "{name}: fresh segment not zeroed");
        fill(seg.as_mut_slice(), 7);
        let want = crc(seg.as_slice());
        assert_eq!(open_in_child(&child, &seg, len as u64), format!("ok {want}"), "{name}");
        // A shorter claim reads a prefix.
        assert_eq!(open_in_child(&child, &seg, 1000), format!("ok {}", crc(&seg.as_slice()[..1000])), "{name}");
    }
}

#[test]
fn claims_past_the_real_size_are_refused_and_the_reader_survives() {
    let child = Child::spawn("reader");
    for (name, opts) in all_backends() {
        let seg = Segment::create(64 << 10, &opts).unwrap();
        let real = seg.len() as u64;
        assert_eq!(open_in_child(&child, &seg, real + 1), "err size", "{name}");
        assert_eq!(open_in_child(&child, &seg, u64::MAX), "err size", "{name}");
        // Still alive and serving.
        assert!(open_in_child(&child, &seg, real).starts_with("ok "), "{name}");
    }
}

#[test]
fn a_segment_shorter_than_claimed_is_refused() {
    // A peer that hands over a memfd it sized smaller than it says (sealed, so otherwise well-formed).
    let child = Child::spawn("reader");
    let fd = rustix::fs::memfd_create("shmgrpc", rustix::fs::MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, 4096).unwrap();
    rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW).unwrap();
    assert_eq!(child.ask("open memfd 8192 -", &[fd.as_fd()]), "err size");
    assert!(child.ask("open memfd 4096 -", &[fd.as_fd()]).starts_with("ok "));
}

#[test]
fn memfds_without_shrink_and_grow_seals_are_refused() {
    let child = Child::spawn("reader");
    use rustix::fs::{MemfdFlags, SealFlags};
    for seals in [SealFlags::empty(), SealFlags::SHRINK, SealFlags::GROW] {
        let fd = rustix::fs::memfd_create("x", MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        if !seals.is_empty() {
            rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
        }
        assert_eq!(child.ask("open memfd 4096 -", &[fd.as_fd()]), "err seals", "{seals:?}");
    }
    // Not a memfd at all: a pipe.
    let (r, _w) = rustix::pipe::pipe().unwrap();
    assert!(child.ask("open memfd 1 -", &[r.as_fd()]).starts_with("err "));
}

#[test]
fn peers_can_only_map_our_memfds_read_only() {
    let child = Child::spawn("reader");
    let seg = Segment::create(1 << 16, &SegmentOptions::new(Backend::Memfd)).unwrap();
    let SegmentHandle::Memfd(fd) = seg.share().unwrap() else { unreachable!() };
    assert_eq!(child.ask("mapw", &[fd.as_fd()]), "denied");
}

#[test]
fn segments_are_0600_under_umask_0() {
    let child = Child::spawn("umask0");
    let (line, _) = common::recv(&child.sock);
    // POSIX: file mode 600; System V: perms 600, plus 1000 (SHM_DEST) because private segments are marked at once.
    assert!(line == "modes 600 1600" || line == "modes 600 600", "{line}");
}

#[test]
fn dropping_the_owner_removes_posix_and_sysv_segments() {
    let p = Segment::create(4096, &SegmentOptions::new(Backend::Posix)).unwrap();
    let name = p.posix_name().unwrap().as_str().to_string();
    assert!(posix_exists(&name));
    drop(p);
    assert!(!posix_exists(&name));

    let keydir = tempfile::tempdir().unwrap();
    let s = Segment::create(4096, &SegmentOptions::new(Backend::SysV).sysv_key(SysVKey::Ftok(keydir.path().into())))
        .unwrap();
    let SegmentHandle::SysV(id) = s.share().unwrap() else { unreachable!() };
    assert!(sysv_exists(id.as_raw()));
    // The ftok key file is gone already.
    assert_eq!(std::fs::read_dir(keydir.path()).unwrap().count(), 0, "ftok key file left behind");
    drop(s);
    assert!(!sysv_exists(id.as_raw()));
}

#[test]
fn peer_ranges_are_overflow_checked() {
    let mut seg = Segment::create(10_000, &SegmentOptions::new(Backend::Memfd)).unwrap();
    fill(seg.as_mut_slice(), 1);
    let peer = PeerSegment::open(seg.share().unwrap(), 10_000).unwrap();
    assert_eq!(peer.range(9_000, 1_000).unwrap(), &seg.as_slice()[9_000..]);
    assert!(matches!(peer.range(9_001, 1_000), Err(Error::OutOfRange { .. })));
    assert!(matches!(peer.range(u64::MAX, 1), Err(Error::OutOfRange { .. })));
    assert!(matches!(peer.range(1, u64::MAX), Err(Error::OutOfRange { .. })));
    assert!(Segment::create(0, &SegmentOptions::default()).is_err());
}

#[test]
fn error_messages_never_name_segments() {
    let seg = Segment::create(4096, &SegmentOptions::new(Backend::Posix)).unwrap();
    let name = seg.posix_name().unwrap().as_str().to_string();
    let e = PeerSegment::open(seg.share().unwrap(), 1 << 30).unwrap_err();
    assert!(!e.to_string().contains(&name[9..]), "{e}");
    assert!(!format!("{e:?}").contains(&name[9..]), "{e:?}");
    let missing = PosixName::parse("/shmgrpc-1-0123456789abcdef").unwrap();
    let e = PeerSegment::open(SegmentHandle::Posix(missing), 1).unwrap_err();
    assert!(!e.to_string().contains("0123456789abcdef"), "{e}");
}

/// A `holder` child and what it holds. Dropping it kills the child and removes both segments, whatever the test did.
struct Held {
    child: Child,
    posix: String,
    sysv: i32,
    _keydir: tempfile::TempDir,
}

impl Held {
    fn start() -> Held {
        let keydir = tempfile::tempdir().unwrap();
        let child = Child::spawn_with("holder", &[("KEYDIR", keydir.path().to_str().unwrap())]);
        let (line, _) = common::recv(&child.sock);
        let words: Vec<&str> = line.split(' ').collect();
        assert_eq!(words[0], "held", "{line}");
        Held { child, posix: words[1].to_string(), sysv: words[2].parse().unwrap(), _keydir: keydir }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.child.kill9();
        let _ = rustix::shm::unlink(self.posix.as_str());
        // SAFETY: IPC_RMID takes no buffer.
        unsafe { libc::shmctl(self.sysv, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

#[test]
fn kill_9_leaves_orphans_that_gc_removes() {
    let mut held = Held::start();
    let (posix, sysv, pid) = (held.posix.clone(), held.sysv, held.child.pid());

    let listed = shmgrpc::inventory::list().unwrap();
    let mine: Vec<_> = listed.iter().filter(|s| s.pid == Some(pid)).collect();
    assert!(mine.iter().any(|s| s.backend == Backend::Posix && s.name == posix && s.alive && s.size == 1 << 20));
    assert!(mine.iter().any(|s| s.backend == Backend::SysV && s.alive && s.attached == Some(1)));
    // A live creator's segments are not collectable.
    assert!(shmgrpc::inventory::gc(true).unwrap().iter().all(|s| s.pid != Some(pid)));

    held.child.kill9();
    assert!(posix_exists(&posix), "a killed owner cannot unlink: that is what gc is for");
    assert!(sysv_exists(sysv));
    let would = shmgrpc::inventory::gc(true).unwrap();
    assert_eq!(would.iter().filter(|s| s.pid == Some(pid)).count(), 2, "{would:?}");
    assert!(posix_exists(&posix), "dry run removed something");
    shmgrpc::inventory::gc(false).unwrap();
    assert!(!posix_exists(&posix));
    assert!(!sysv_exists(sysv));
}

#[test]
fn attach_cache_maps_once_and_forgets_dead_creators() {
    let mut held = Held::start();
    let (posix, sysv) = (held.posix.clone(), held.sysv);

    let cache = shmgrpc::AttachCache::<String>::new();
    let open_posix = || Ok(SegmentHandle::Posix(PosixName::parse(&posix).unwrap()));
    let a = cache.attach(posix.clone(), 1 << 20, open_posix).unwrap();
    let b = cache.attach(posix.clone(), 4096, || panic!("a cached segment must not be opened again")).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert!(matches!(cache.attach(posix.clone(), (1 << 20) + 1, open_posix), Err(Error::SizeMismatch { .. })));
    let s = cache.attach(format!("sysv {sysv}"), 1 << 20, || Ok(SegmentHandle::SysV(SysVId::from_raw(sysv)))).unwrap();
    assert_eq!(s.creator_pid(), Some(held.child.pid()));
    assert_eq!(a.creator_pid(), Some(held.child.pid()));
    let st = cache.stats();
    assert_eq!((st.segments, st.bytes, st.hits, st.misses), (2, 2 << 20, 1, 2));

    held.child.kill9();
    assert_eq!(cache.detach_dead_creators(), 2);
    assert!(cache.is_empty());
    // Readers still holding a mapping keep it.
    assert_eq!(a.range(0, 16).unwrap(), &[0u8; 16]);
    // The keyed System V segment was marked for removal when we attached: it goes with our last attachment.
    assert!(sysv_exists(sysv));
    drop(s);
    assert!(!sysv_exists(sysv), "a keyed segment outlived both processes");
    drop((a, b));
    shmgrpc::inventory::gc(false).unwrap();
    assert!(!posix_exists(&posix));
}

#[test]
fn a_posix_segment_shrunk_under_its_reader_reads_as_zeros_instead_of_sigbus() {
    let mut seg = Segment::create(1 << 20, &SegmentOptions::new(Backend::Posix)).unwrap();
    fill(seg.as_mut_slice(), 3);
    let head: Vec<u8> = seg.as_slice()[..64].to_vec();
    let peer = PeerSegment::open(seg.share().unwrap(), 1 << 20).unwrap();
    assert!(!peer.is_poisoned());
    assert_eq!(peer.range(0, 64).unwrap(), &head[..]);
    // The owner (a hostile one would do this from its own process) shrinks the file under the mapping.
    let fd =
        rustix::shm::open(seg.posix_name().unwrap().as_str(), rustix::shm::OFlags::RDWR, rustix::fs::Mode::empty())
            .unwrap();
    rustix::fs::ftruncate(&fd, 4096).unwrap();
    // Reading past the new end would raise SIGBUS; the guard turns it into zeros and a poisoned flag.
    let tail = peer.range((1 << 20) - 4096, 4096).unwrap();
    let sum: u64 = tail.iter().map(|&b| u64::from(std::hint::black_box(b))).sum();
    assert_eq!(sum, 0);
    assert!(peer.is_poisoned());
    // What is still inside the file reads as before.
    assert_eq!(peer.range(0, 64).unwrap(), &head[..]);
    drop(peer);
    drop(seg); // the owner never reads its own (now short) mapping again
}

#[test]
fn prefaulting_a_prefix_or_more_than_the_segment_is_fine() {
    let mut seg = Segment::create(1 << 20, &SegmentOptions::new(Backend::Memfd)).unwrap();
    seg.prefault(4096).unwrap();
    seg.prefault(usize::MAX).unwrap(); // clamped to the segment
    seg.as_mut_slice().fill(3);
    assert!(seg.as_slice().iter().all(|&b| b == 3));
}

/// A file in /dev/shm shaped like one of ours, of `len` bytes, named with `pid`; returns its name and descriptor.
fn posix_file(pid: u32, len: u64) -> (String, std::os::fd::OwnedFd) {
    let mut r = [0u8; 8];
    getrandom::fill(&mut r).unwrap();
    let name = format!("/shmgrpc-{pid}-{:016x}", u64::from_le_bytes(r));
    let flags = rustix::shm::OFlags::CREATE | rustix::shm::OFlags::EXCL | rustix::shm::OFlags::RDWR;
    let fd = rustix::shm::open(name.as_str(), flags, rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    (name, fd)
}

/// Liveness is the creator's lock, not its pid: the pid in a name is the creator's in its own pid namespace, which
/// a `gc` in another one cannot see (or sees as another process).
#[test]
fn gc_judges_posix_segments_by_their_creators_lock_not_by_the_pid_in_the_name() {
    // A creator whose pid this namespace does not know (another pid namespace) and who holds the lock: alive.
    let (live, fd) = posix_file(u32::MAX - 1, 4096);
    rustix::fs::flock(&fd, rustix::fs::FlockOperation::LockShared).unwrap();
    // A file named with a live pid (ours) that nobody locks: its creator died and the pid was reused, or it lived
    // in another pid namespace. An orphan.
    let (dead, dead_fd) = posix_file(std::process::id(), 4096);
    drop(dead_fd);
    // A file of size 0: possibly one being created (the lock is taken before the size is set). Left alone.
    let (young, young_fd) = posix_file(u32::MAX - 2, 0);
    drop(young_fd);
    // A segment of ours, made the usual way: its lock is held while it lives.
    let ours = Segment::create(4096, &SegmentOptions::new(Backend::Posix)).unwrap();
    let ours_name = ours.posix_name().unwrap().as_str().to_string();

    let listed = shmgrpc::inventory::list().unwrap();
    let alive = |n: &str| listed.iter().find(|s| s.name == n).map(|s| s.alive);
    assert_eq!([alive(&live), alive(&young), alive(&ours_name)], [Some(true); 3]);
    // (Another test binary's `gc`, run in parallel by nextest, may have removed the orphan already.)
    assert_ne!(alive(&dead), Some(true));
    let would: Vec<String> = shmgrpc::inventory::gc(true).unwrap().into_iter().map(|s| s.name).collect();
    assert!(would.contains(&dead) || !posix_exists(&dead), "{would:?}");
    assert!(![&live, &young, &ours_name].iter().any(|n| would.contains(n)), "{would:?}");
    shmgrpc::inventory::gc(false).unwrap();
    assert!(!posix_exists(&dead));
    assert!(posix_exists(&live) && posix_exists(&young) && posix_exists(&ours_name));
    // Once the creator lets go (its process ends, or here its descriptor), the segment is an orphan.
    drop(fd);
    shmgrpc::inventory::gc(false).unwrap();
    assert!(!posix_exists(&live));
    let _ = rustix::shm::unlink(young.as_str());
    drop(ours);
    assert!(!posix_exists(&ours_name));
}
