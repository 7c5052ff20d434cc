//! The protocol's conformance suite (`conformance/`) against `shmgrpc serve`, through the CLI a third
//! implementation would use (`shmgrpc conformance --target ... --json`): every case passes. The Python servers run
//! the same suite in `python/tests/test_conformance.py`.

mod common;

use std::process::Command;

/// Runs `shmgrpc conformance --json` with `args`; every case passed: their report lines.
fn every_case_passes(args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_shmgrpc"))
        .args(["conformance", "--json"])
        .args(args)
        .output()
        .expect("shmgrpc conformance runs");
    let lines = common::json_lines(&out.stdout);
    let failed: Vec<_> = lines.iter().filter(|l| l["passed"] != true).collect();
    assert!(failed.is_empty(), "failed cases: {failed:#?}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    lines
}

#[test]
fn shmgrpc_serve_passes_every_conformance_case() {
    let srv = common::serve_blocking(&[]);
    let lines = every_case_passes(&["--target", &srv.unix]);
    let listed = Command::new(env!("CARGO_BIN_EXE_shmgrpc")).args(["conformance", "--list"]).output().unwrap();
    let cases = String::from_utf8_lossy(&listed.stdout).lines().filter(|l| !l.starts_with("client.")).count();
    assert_eq!(lines.len(), cases, "every server case ran");
    assert!(cases >= 40, "{cases} cases");
    for l in &lines {
        assert!(l["section"].as_str().is_some_and(|s| s.starts_with('§')), "a case without its section: {l}");
    }
}

/// docs/protocol.md's appendix lists every case, with its section and rule, as `shmgrpc conformance --list` does.
#[test]
fn the_spec_lists_every_case_with_its_section() {
    let listed = Command::new(env!("CARGO_BIN_EXE_shmgrpc")).args(["conformance", "--list"]).output().unwrap();
    assert!(listed.status.success());
    let cases: Vec<(String, String, String)> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| {
            let mut p = l.split_whitespace();
            let (id, section) = (p.next().unwrap().to_string(), p.next().unwrap().to_string());
            (id, section, p.collect::<Vec<_>>().join(" "))
        })
        .collect();
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md")).unwrap();
    let appendix = spec.split("## Appendix: conformance cases").nth(1).expect("the appendix");
    let rows: Vec<(String, String, String)> = appendix
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
            (cells[0].trim_matches('`').to_string(), cells[1].to_string(), cells[2].to_string())
        })
        .collect();
    assert_eq!(rows, cases, "docs/protocol.md's appendix and the suite disagree");
}

/// The client cases against `shmgrpc call`: a scripted fake server (plain, refusing, with bad challenges, refusing
/// registrations, replying from its own segment or with the client's region) and the client does what the spec
/// says every time.
#[test]
fn shmgrpc_call_passes_every_client_conformance_case() {
    let client = format!("{} call --target {{target}} --size 1MiB --repeat 2", env!("CARGO_BIN_EXE_shmgrpc"));
    let lines = every_case_passes(&["--client", &client]);
    assert!(lines.len() >= 10, "{} cases", lines.len());
}
