//! Isolation between uids: another uid cannot open or attach our segments nor reach our side channel, and is
//! served inline unless the server allows it. Needs root (to create the second uid): the tests are
//! `#[ignore = "needs root"]`, and `.ci/run` (which runs as root) runs them explicitly with `--ignored`. Run that
//! way, a missing prerequisite is a failure, not a skip.

mod common;

use std::os::fd::AsRawFd;
use std::process::{Command, Output};

use common::{BIN, calls_via, json_lines, serve_blocking};
use shmgrpc::segment::SysVKey;
use shmgrpc::{Backend, Segment, SegmentHandle, SegmentOptions};

const USER: &str = "shmgrpc-iso";

/// The second uid and gid (created if needed), and a copy of the `shmgrpc` binary it may execute (the build
/// directory may sit under a private home).
fn other() -> ((u32, u32), UserBin) {
    assert_eq!(rustix::process::getuid().as_raw(), 0, "creating a second uid needs root");
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id("-u").is_none() {
        let made = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER])
            .output()
            .expect("useradd");
        assert!(made.status.success(), "useradd failed: {made:?}");
    }
    let user = (id("-u").unwrap(), id("-g").unwrap());
    let bin = UserBin::new();
    let out = as_user(user, bin.path(), &["--version"]);
    assert!(out.status.success(), "uid {} cannot run {}: {}", user.0, bin.path(), text(&out));
    (user, bin)
}

/// A copy of the binary in a fresh world-readable directory under `/tmp`, removed on drop.
struct UserBin {
    _dir: tempfile::TempDir,
    path: String,
}

impl UserBin {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("shmgrpc-iso").tempdir_in("/tmp").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("shmgrpc");
        std::fs::copy(BIN, &path).unwrap();
        UserBin { path: path.to_str().unwrap().to_string(), _dir: dir }
    }

    fn path(&self) -> &str {
        &self.path
    }
}

fn as_user((uid, gid): (u32, u32), prog: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([&format!("--reuid={uid}"), &format!("--regid={gid}"), "--clear-groups", prog])
        .args(args)
        .output()
        .expect("setpriv")
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

#[test]
#[ignore = "needs root"]
fn another_uid_is_served_inline_unless_allowed() {
    let (user, bin) = other();
    let srv = serve_blocking(&[]);
    let out = as_user(user, bin.path(), &["call", "--target", &srv.tcp, "--size", "1MiB", "--repeat", "2", "--json"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(json_lines(&out.stdout)[0]["fallback"].is_string(), "{t}");
    assert_eq!(calls_via(&out.stdout, "inline", "inline"), 2, "{t}");

    let uid = user.0.to_string();
    let srv = serve_blocking(&["--allow-uid", &uid]);
    let out = as_user(user, bin.path(), &["call", "--target", &srv.tcp, "--size", "1MiB", "--repeat", "2", "--json"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(json_lines(&out.stdout)[0]["shared_memory"], true, "{t}");
    assert_eq!(calls_via(&out.stdout, "shm", "shm"), 2, "{t}");
}

#[test]
#[ignore = "needs root"]
fn another_uid_cannot_open_attach_or_reach_what_is_ours() {
    let (user, _bin) = other();
    // POSIX: mode 0600, so the file cannot even be opened.
    let posix = Segment::create(4096, &SegmentOptions::new(Backend::Posix)).unwrap();
    let path = format!("/dev/shm{}", posix.posix_name().unwrap().as_str());
    let out = as_user(user, "/bin/cat", &[&path]);
    assert!(!out.status.success() && text(&out).contains("Permission denied"), "{}", text(&out));

    // memfd: no name; reaching it through /proc/<pid>/fd needs ptrace rights over us.
    let memfd = Segment::create(4096, &SegmentOptions::new(Backend::Memfd)).unwrap();
    let SegmentHandle::Memfd(fd) = memfd.share().unwrap() else { unreachable!() };
    let proc_path = format!("/proc/{}/fd/{}", std::process::id(), fd.as_raw_fd());
    let out = as_user(user, "/bin/cat", &[&proc_path]);
    assert!(!out.status.success(), "another uid read our memfd: {}", text(&out));

    // The side channel is mode 0600.
    let srv = serve_blocking(&[]);
    let side = srv.side.clone().unwrap();
    let py = |code: String| as_user(user, "/usr/bin/env", &["python3", "-c", &code]);
    assert!(Command::new("python3").arg("--version").output().is_ok(), "python3 is needed for the socket checks");
    let out = py(format!(
        "import socket\ns=socket.socket(socket.AF_UNIX)\ntry:\n  s.connect({side:?}); print('connected')\nexcept PermissionError: print('denied')"
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "denied", "{}", text(&out));

    // System V: mode 0600, so shmat is refused.
    for key in [SysVKey::Private, SysVKey::Ftok(std::env::temp_dir())] {
        let seg = Segment::create(4096, &SegmentOptions::new(Backend::SysV).sysv_key(key)).unwrap();
        let SegmentHandle::SysV(id) = seg.share().unwrap() else { unreachable!() };
        let out = py(format!(
            "import ctypes\nl=ctypes.CDLL(None, use_errno=True)\nl.shmat.restype=ctypes.c_void_p\n\
             r=l.shmat({}, None, 0o10000)\nprint('denied' if r in (None, 2**64-1) and ctypes.get_errno()==13 else 'attached')",
            id.as_raw()
        ));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "denied", "{}", text(&out));
    }
}

/// An abstract side channel has no file mode: any process of the network namespace can connect to it. The uid
/// check on every connection is then the only gate, and it holds.
#[test]
#[ignore = "needs root"]
fn another_uid_connecting_to_an_abstract_side_channel_is_refused_by_the_uid_check() {
    let (user, bin) = other();
    let name = format!("@shmgrpc-iso-{}", std::process::id());
    let srv = serve_blocking(&["--side-channel", &name]);
    assert_eq!(srv.side.as_deref(), Some(name.as_str()));
    let out = as_user(user, bin.path(), &["call", "--target", &srv.tcp, "--size", "1MiB", "--repeat", "2", "--json"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(json_lines(&out.stdout)[0]["fallback"], "handshake_failed", "{t}");
    assert_eq!(calls_via(&out.stdout, "inline", "inline"), 2, "{t}");
    // The server's own uid gets its session through the same abstract socket.
    let out = Command::new(BIN)
        .args(["call", "--target", &srv.tcp, "--size", "1MiB", "--repeat", "2", "--json"])
        .output()
        .unwrap();
    assert_eq!(calls_via(&out.stdout, "shm", "shm"), 2, "{}", text(&out));
}

/// The client checks the server's uid too: a server that runs under another uid (not root) gets no session from
/// it, even though that server admits the client's uid.
#[test]
#[ignore = "needs root"]
fn a_client_refuses_a_server_that_runs_under_another_uid() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    let (user, bin) = other();
    // A directory the other uid can create its sockets in.
    let dir = tempfile::Builder::new().prefix("shmgrpc-iso").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.path().join("grpc.sock");
    let mut server = Command::new("setpriv")
        .args([&format!("--reuid={}", user.0), &format!("--regid={}", user.1), "--clear-groups", bin.path()])
        .args(["serve", "--listen", &format!("unix:{}", sock.display()), "--allow-uid", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    let out = Command::new(BIN)
        .args(["call", "--target", &format!("unix:{}", sock.display()), "--size", "1MiB", "--repeat", "2", "--json"])
        .env("RUST_LOG", "shmgrpc=debug")
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(json_lines(&out.stdout)[0]["fallback"], "handshake_failed", "{ready}{t}");
    assert!(t.contains("server runs under another uid"), "refused for another reason: {t}");
    assert_eq!(calls_via(&out.stdout, "inline", "inline"), 2, "{t}");
}
