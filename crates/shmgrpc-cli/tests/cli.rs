//! The `shmgrpc` binary end to end: the pool demo between two processes, `ls` and `gc`.

use std::process::Command;

fn shmgrpc(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shmgrpc")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn pool_demo_moves_checksummed_payloads_on_every_backend() {
    for backend in ["memfd", "posix", "sysv"] {
        let (ok, out) = shmgrpc(&["pool-demo", "--size", "3MiB", "--repeat", "3", "--backend", backend]);
        assert!(ok, "{backend}: {out}");
        assert_eq!(out.matches("crc ok").count(), 6, "{backend}: {out}");
        assert!(out.contains("reused its mapping"), "{backend}: the attach cache was not used: {out}");
        assert!(out.contains("all segments released"), "{backend}: {out}");
    }
}

#[test]
fn ls_and_gc_answer_in_json() {
    let (ok, out) = shmgrpc(&["ls", "--json"]);
    assert!(ok, "{out}");
    assert!(serde_json::from_str::<serde_json::Value>(&out).unwrap().is_array());
    let (ok, out) = shmgrpc(&["gc", "--dry-run", "--json"]);
    assert!(ok, "{out}");
    assert!(serde_json::from_str::<serde_json::Value>(&out).unwrap().is_array());
}

#[test]
fn bad_arguments_are_refused() {
    assert!(!shmgrpc(&["pool-demo", "--size", "0B"]).0);
    assert!(!shmgrpc(&["pool-demo", "--backend", "nope"]).0);
}
