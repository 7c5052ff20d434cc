//! The `shmgrpc` binary end to end: the pool demo between two processes, `ls`, `gc` and `bench`, each read
//! through its JSON output.

use std::process::Command;

fn shmgrpc(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shmgrpc")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn pool_demo_moves_checksummed_payloads_on_every_backend() {
    for backend in ["memfd", "posix", "sysv"] {
        let (ok, out) = shmgrpc(&["pool-demo", "--size", "3MiB", "--repeat", "3", "--backend", backend, "--json"]);
        assert!(ok, "{backend}: {out}");
        let lines: Vec<serde_json::Value> = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let rounds = |via: &str| lines.iter().filter(|l| l["event"] == "round" && l["via"] == via).collect::<Vec<_>>();
        let (shm, socket) = (rounds("shm"), rounds("socket"));
        assert_eq!((shm.len(), socket.len()), (3, 3), "{backend}: {out}");
        assert!(shm.iter().chain(&socket).all(|r| r["checksum"] == "ok"), "{backend}: {out}");
        // The first round creates the buffer and the child maps it; later rounds reuse both.
        assert_eq!((&shm[0]["buffer"], &shm[0]["child_mapping"]), (&"new".into(), &"new".into()), "{backend}");
        for r in &shm[1..] {
            assert_eq!((&r["buffer"], &r["child_mapping"]), (&"reused".into(), &"reused".into()), "{backend}: {r}");
        }
        let done = lines.last().unwrap();
        assert_eq!(done["event"], "done", "{backend}: {out}");
        assert_eq!((&done["pool_idle"], &done["segments_left"]), (&true.into(), &0.into()), "{backend}: {out}");
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

#[test]
fn bench_reports_every_cell_in_json_and_draws_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let svg = dir.path().join("bench.svg");
    let (ok, out) = shmgrpc(&[
        "bench",
        "--sizes",
        "4KiB,256KiB",
        "--ops",
        "echo,upload,bidi",
        "--stream-sizes",
        "256KiB",
        "--messages",
        "4",
        "--cold",
        "--cold-samples",
        "1",
        "--iterations",
        "3",
        "--clients",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["machine"]["cores"].as_u64().unwrap() >= 1);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), (2 * 2 + 1 + 2) * 4, "(sizes x unary ops + streams + cold) x transports");
    assert_eq!(results.iter().filter(|r| r["cold"] == true).count(), 2 * 4, "cold echo and burst per transport");
    for r in results {
        for key in [
            "transport",
            "op",
            "size",
            "messages",
            "cold",
            "msgs_per_sec",
            "clients",
            "iterations",
            "median_ns",
            "p99_ns",
            "e2e_median_ns",
            "bytes_per_sec",
            "client_cpu_s",
            "server_cpu_s",
            "client_peak_rss_bytes",
            "server_peak_rss_bytes",
        ] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
        assert!(r.get("p999_ns").is_some(), "p999_ns missing in {r}");
        assert!(r["median_ns"].as_u64().unwrap() > 0);
        if r["cold"] == true {
            continue; // one fresh client process per sample
        }
        assert_eq!(r["clients"], 2);
        let streams = r["op"] == "bidi";
        assert_eq!(r["messages"], if streams { 4 } else { 1 }, "{r}");
        let shared = matches!(r["transport"].as_str().unwrap(), "shm" | "loan");
        if r["size"] == 262144 {
            assert_eq!(r["shm_messages"].as_u64().unwrap() > 0, shared, "{r}");
        }
    }
    assert_eq!(v["memcpy"].as_array().unwrap().len(), 2);
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
}
