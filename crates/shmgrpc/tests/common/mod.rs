//! Helpers for tests that need two real processes: the test binary re-runs itself as the child, selecting the
//! ignored `child_main` test, and parent and child talk over a Unix socket that also carries descriptors.
#![allow(dead_code)]

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shmgrpc::fdpass;

pub(crate) const ROLE: &str = "SHMGRPC_TEST_CHILD_ROLE";
pub(crate) const SOCK: &str = "SHMGRPC_TEST_CHILD_SOCK";

/// A child process of the test binary, killed and reaped on drop (so a failing test leaves no process behind).
pub(crate) struct Child {
    pub child: std::process::Child,
    pub sock: UnixStream,
    _dir: tempfile::TempDir,
}

impl Child {
    /// Starts `role` in a child process and waits for it to connect.
    pub(crate) fn spawn(role: &str) -> Child {
        Self::spawn_with(role, &[])
    }

    pub(crate) fn spawn_with(role: &str, env: &[(&str, &str)]) -> Child {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "child_main", "--ignored", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(SOCK, &path)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        listener.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let sock = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(status) = child.try_wait().unwrap() {
                        panic!("child {role} exited before connecting: {status}");
                    }
                    assert!(start.elapsed() < Duration::from_secs(30), "child {role} never connected");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Child { child, sock, _dir: dir }
    }

    pub(crate) fn ask(&self, line: &str, fds: &[BorrowedFd<'_>]) -> String {
        send(&self.sock, line, fds);
        recv(&self.sock).0
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9` and reap.
    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends one line (with descriptors). Every exchange is a request and a reply, so lines never merge.
pub(crate) fn send(sock: &UnixStream, line: &str, fds: &[BorrowedFd<'_>]) {
    let msg = format!("{line}\n");
    if fds.is_empty() {
        (&*sock).write_all(msg.as_bytes()).unwrap();
    } else {
        let n = fdpass::send_with_fds(sock.as_fd(), msg.as_bytes(), fds).unwrap();
        (&*sock).write_all(&msg.as_bytes()[n..]).unwrap();
    }
}

/// Receives one line and the descriptors that came with it; an empty string means the peer closed.
pub(crate) fn recv(sock: &UnixStream) -> (String, Vec<OwnedFd>) {
    let mut out = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        let (n, mut got) = fdpass::recv_with_fds(sock.as_fd(), &mut buf).unwrap();
        fds.append(&mut got);
        out.extend_from_slice(&buf[..n]);
        if n == 0 || out.ends_with(b"\n") {
            break;
        }
    }
    (String::from_utf8(out).unwrap().trim_end().to_string(), fds)
}

/// The child's end: connects to the parent.
pub(crate) fn child_socket() -> UnixStream {
    UnixStream::connect(std::env::var(SOCK).expect("child socket path")).unwrap()
}

/// Fills `buf` with a pattern that differs per position and per `seed`.
pub(crate) fn fill(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 12) as u8);
    }
}

pub(crate) fn crc(buf: &[u8]) -> u32 {
    crc32fast::hash(buf)
}

/// Whether a POSIX segment name exists in /dev/shm.
pub(crate) fn posix_exists(name: &str) -> bool {
    std::path::Path::new("/dev/shm").join(name.trim_start_matches('/')).exists()
}

/// Whether a System V id still exists.
pub(crate) fn sysv_exists(id: i32) -> bool {
    std::fs::read_to_string("/proc/sysvipc/shm")
        .unwrap()
        .lines()
        .skip(1)
        .any(|l| l.split_whitespace().nth(1).and_then(|s| s.parse::<i32>().ok()) == Some(id))
}
