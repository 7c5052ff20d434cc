//! shmgrpc between containers, built from the kernel's namespaces the way Docker and Kubernetes build them: client
//! and server each in new mount, IPC and pid namespaces (`unshare`), each with its own tmpfs `/tmp` and a 64 MiB
//! `/dev/shm`, sharing only the directory of the gRPC socket (mounted under another path on the client's side), or
//! only the network namespace. No `--ipc=host`, no `/dev/shm` sizing, no shared pid namespace.
//!
//! Every test needs root (namespaces, mounts): they are `#[ignore = "needs root"]`, and `.ci/run` (which runs as
//! root) runs them with `--ignored`. They fail, never skip, when a prerequisite is missing. docs/deploy.md quotes
//! their figures.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, calls_via, json_lines};

/// What every container gets: a private `/tmp` and a 64 MiB `/dev/shm` (Docker's default size), then `cmd`.
fn container_script(cmd: &str) -> String {
    format!("mount -t tmpfs none /tmp && mount -t tmpfs -o size=64m none /dev/shm && {cmd}")
}

/// `unshare` into new mount, IPC and pid namespaces (plus `extra`), running `script` in `sh`; the child gets
/// `signal` when the `unshare` process dies.
fn unshare(extra: &[&str], signal: &str, script: &str) -> Command {
    assert_eq!(rustix::process::getuid().as_raw(), 0, "namespaces and mounts need root");
    let mut c = Command::new("unshare");
    c.args(["--mount", "--ipc", "--pid", "--mount-proc", "--propagation", "private"])
        .arg(format!("--kill-child={signal}"))
        .args(extra)
        .args(["sh", "-c", script]);
    c
}

/// What the containers see of the test, outside `/tmp` (which each container replaces with its own, and under which
/// the build directory itself may lie): a copy of the `shmgrpc` binary, and the directory the containers share.
/// Removed when the test ends.
struct Stage {
    _dir: tempfile::TempDir,
    bin: String,
    shared: PathBuf,
}

impl Stage {
    fn new() -> Stage {
        std::fs::create_dir_all("/var/tmp").unwrap();
        let dir = tempfile::Builder::new().prefix("shmgrpc-containers").tempdir_in("/var/tmp").unwrap();
        let bin = dir.path().join("shmgrpc");
        std::fs::copy(BIN, &bin).unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        Stage { bin: bin.to_str().unwrap().to_string(), shared, _dir: dir }
    }
}

/// A `shmgrpc serve` in containers of its own; its readiness line; the server ends with the `unshare` process.
struct Server {
    child: Child,
    ready: serde_json::Value,
}

impl Server {
    fn start(extra_ns: &[&str], signal: &str, script: &str) -> Server {
        let mut child = unshare(extra_ns, signal, script).stdout(Stdio::piped()).spawn().expect("unshare");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("no readiness line ({e}): {line:?}"));
        assert_eq!(ready["event"], "ready", "{ready}");
        Server { child, ready }
    }

    /// Ends the server with the signal given at start (`unshare` ignores SIGTERM while its child runs; killed,
    /// it has the kernel send that signal to the child) and waits for `unshare`.
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `shmgrpc call` (the staged binary `bin`) in containers of its own; its output, checked for success.
fn call_in(bin: &str, extra_ns: &[&str], setup: &str, args: &str) -> Output {
    let script = container_script(&format!("{setup}exec {bin} call {args} --json"));
    let out = unshare(extra_ns, "KILL", &script).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Waits until `f` holds (a process going away, a file being removed).
fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root"]
fn a_1_gib_echo_crosses_containers_through_shared_memory_with_default_settings() {
    let stage = Stage::new();
    let sock = stage.shared.join("grpc.sock");
    // The server: defaults only (its side channel goes beside its socket).
    let server_cmd = format!("exec {} serve --listen unix:{}", stage.bin, sock.display());
    let mut srv = Server::start(&[], "TERM", &container_script(&server_cmd));
    assert_eq!(srv.ready["side_channel"], format!("{}.shmgrpc", sock.display()), "{}", srv.ready);
    // The client sees the shared directory under another path, as a volume mounted elsewhere would be.
    let setup = format!("mkdir /tmp/volume && mount --bind {} /tmp/volume && ", stage.shared.display());
    let out = call_in(&stage.bin, &[], &setup, "--target unix:/tmp/volume/grpc.sock --size 1GiB --repeat 1");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines[0]["shared_memory"], true, "{}", text(&out));
    // Checksummed both ways by `call` (it fails on a bad checksum), and through shared memory both ways.
    assert_eq!(calls_via(&out.stdout, "shm", "shm"), 1, "{}", text(&out));
    let call = lines.iter().find(|l| l["event"] == "call").unwrap();
    assert_eq!(call["checksum"], "ok");
    eprintln!(
        "1 GiB echo between containers: transport {} ms, end to end {} ms",
        call["transport_ms"], call["end_to_end_ms"]
    );
    srv.stop();
    eventually("the server removed its side channel", || !Path::new(&format!("{}.shmgrpc", sock.display())).exists());
}

#[test]
#[ignore = "needs root"]
fn a_tcp_server_offers_an_abstract_side_channel_to_containers_of_its_network_namespace() {
    let stage = Stage::new();
    let name = abstract_name();
    let server_cmd = format!("exec {} serve --listen 127.0.0.1:0 --side-channel {name}", stage.bin);
    let srv = Server::start(&[], "TERM", &container_script(&server_cmd));
    assert_eq!(srv.ready["side_channel"], name.as_str());
    let tcp = srv.ready["listen"][0].as_str().unwrap().to_string();
    // A sidecar: its own mount, IPC and pid namespaces and no shared directory; the network namespace is shared
    // (as in a Kubernetes pod).
    let out = call_in(&stage.bin, &[], "", &format!("--target {tcp} --size 20MiB --repeat 3"));
    assert_eq!(json_lines(&out.stdout)[0]["shared_memory"], true, "{}", text(&out));
    assert_eq!(calls_via(&out.stdout, "shm", "shm"), 3, "{}", text(&out));
}

#[test]
#[ignore = "needs root"]
fn a_client_in_another_network_namespace_cannot_reach_an_abstract_side_channel_and_goes_inline() {
    let stage = Stage::new();
    let sock = stage.shared.join("grpc.sock");
    let name = abstract_name();
    let server_cmd = format!("exec {} serve --listen unix:{} --side-channel {name}", stage.bin, sock.display());
    let _srv = Server::start(&[], "TERM", &container_script(&server_cmd));
    // The gRPC socket is reachable (a file in a shared directory); the abstract socket is not (another network
    // namespace): every call still succeeds, inline, and the reason is the right one.
    let out = call_in(&stage.bin, &["--net"], "", &format!("--target unix:{} --size 1MiB --repeat 2", sock.display()));
    assert_eq!(json_lines(&out.stdout)[0]["fallback"], "side_channel_unreachable", "{}", text(&out));
    assert_eq!(calls_via(&out.stdout, "inline", "inline"), 2, "{}", text(&out));
}

/// A fresh abstract socket name (`@...`).
fn abstract_name() -> String {
    use std::hash::{BuildHasher, RandomState};
    format!("@shmgrpc-test-{}-{:016x}", std::process::id(), RandomState::new().hash_one(Instant::now()))
}

/// POSIX segments in /dev/shm named `shmgrpc-<pid>-...` with this pid.
fn posix_segments_of(pid: u32) -> HashSet<PathBuf> {
    std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("shmgrpc-{pid}-"))))
        .collect()
}

/// A sidecar that shares `/dev/shm` with the server but not its pid namespace runs `gc`: it cannot see the
/// server's pid, and must not take its live segments for orphans (they are judged by the lock their creator
/// holds); once the server is dead (killed, so it cannot unlink them), the same `gc` removes them.
#[test]
#[ignore = "needs root"]
fn gc_from_another_pid_namespace_leaves_a_live_servers_segments_and_removes_a_dead_ones() {
    let stage = Stage::new();
    let sock = stage.shared.join("grpc.sock");
    // Shares /dev/shm with the host (no private one): POSIX segments, whose names carry pid 1 of its namespace.
    let server_cmd = format!(
        "mount -t tmpfs none /tmp && exec {} serve --backend posix --listen unix:{}",
        stage.bin,
        sock.display()
    );
    let mut srv = Server::start(&[], "KILL", &server_cmd);
    assert_eq!(srv.ready["pid"], 1, "the server is pid 1 of its own namespace");
    let before = posix_segments_of(1);
    // Replies of 8 MiB to a client that keeps its session (the server drops a session's segments when it ends):
    // the server's pool creates POSIX segments for them. (This client, in the host's pid namespace, refuses them and
    // gets the replies inline: a name carries the creator's pid in its own namespace, pid 1 here, not the pid the
    // kernel reports for the peer. docs/deploy.md: use memfd across pid namespaces.)
    let mut client = KillOnDrop(
        Command::new(BIN)
            .args(["call", "--target", &format!("unix:{}", sock.display()), "--op", "download", "--size", "8MiB"])
            .args(["--repeat", "1000000", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(client.0.stdout.take().unwrap()).lines();
    for _ in 0..4 {
        let line = lines.next().unwrap().unwrap();
        assert!(!line.contains("\"checksum\":\"bad"), "{line}");
    }
    let live: HashSet<PathBuf> = posix_segments_of(1).difference(&before).cloned().collect();
    assert!(!live.is_empty(), "the server created no POSIX segment");

    let gc = |what: &str| {
        let out = unshare(&[], "KILL", &format!("exec {BIN} gc --json")).output().unwrap();
        assert!(out.status.success(), "{what}: {}", text(&out));
        let removed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        removed
            .iter()
            .map(|s| PathBuf::from("/dev/shm").join(s["name"].as_str().unwrap().trim_start_matches('/')))
            .collect::<HashSet<_>>()
    };
    let removed = gc("gc beside a live server");
    assert!(live.is_disjoint(&removed), "gc removed a live server's segments: {removed:?}");
    assert!(live.iter().all(|p| p.exists()));

    // Killed: it cannot unlink. From another pid namespace, gc now finds them orphaned.
    srv.stop();
    eventually("the server's lock is released", || {
        Command::new(BIN).args(["ls", "--json"]).output().is_ok_and(|o| {
            let list: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap_or_default();
            list.iter().filter(|s| s["pid"] == 1 && s["backend"] == "posix").all(|s| s["alive"] == false)
        })
    });
    let removed = gc("gc after the server died");
    assert!(live.is_subset(&removed), "{live:?} not in {removed:?}");
    assert!(live.iter().all(|p| !p.exists()));
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
