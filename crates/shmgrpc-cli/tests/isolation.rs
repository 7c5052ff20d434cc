//! Isolation between uids: another uid cannot open or attach our segments nor reach our side channel, and is
//! served inline unless the server allows it. Needs root (to create the second uid); otherwise skipped with a
//! message saying why.

mod common;

use std::os::fd::AsRawFd;
use std::process::{Command, Output};

use common::{BIN, serve};
use shmgrpc::segment::SysVKey;
use shmgrpc::{Backend, Segment, SegmentHandle, SegmentOptions};

const USER: &str = "shmgrpc-iso";

/// The second uid and gid, created if needed; `None` (after saying why) when this machine cannot have one.
fn other() -> Option<(u32, u32)> {
    if rustix::process::getuid().as_raw() != 0 {
        println!("skipped: creating a second uid needs root");
        return None;
    }
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id("-u").is_none() {
        let made = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER])
            .output();
        if !made.as_ref().is_ok_and(|o| o.status.success()) {
            println!("skipped: useradd failed: {made:?}");
            return None;
        }
    }
    let (uid, gid) = (id("-u")?, id("-g")?);
    if !as_user((uid, gid), BIN, &["--version"]).status.success() {
        println!("skipped: {BIN} is not executable by uid {uid} (a parent directory is private)");
        return None;
    }
    Some((uid, gid))
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
fn another_uid_is_served_inline_unless_allowed() {
    let Some(user) = other() else { return };
    let srv = serve(&[]);
    let out = as_user(user, BIN, &["call", "--target", &srv.tcp, "--size", "1MiB", "--repeat", "2"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("inline only"), "{t}");
    assert_eq!(t.matches("request inline, response inline, checksum ok").count(), 2, "{t}");

    let uid = user.0.to_string();
    let srv = serve(&["--allow-uid", &uid]);
    let out = as_user(user, BIN, &["call", "--target", &srv.tcp, "--size", "1MiB", "--repeat", "2"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("shared memory session"), "{t}");
    assert_eq!(t.matches("request shm, response shm, checksum ok").count(), 2, "{t}");
}

#[test]
fn another_uid_cannot_open_attach_or_reach_what_is_ours() {
    let Some(user) = other() else { return };
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
    let srv = serve(&[]);
    let side = srv.side.clone().unwrap();
    let py = |code: String| as_user(user, "/usr/bin/env", &["python3", "-c", &code]);
    if Command::new("python3").arg("--version").output().is_err() {
        println!("python3 not found: skipping the System V and socket checks");
        return;
    }
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
