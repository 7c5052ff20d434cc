//! The shmgrpc protocol's conformance suite: one case per rule of `docs/protocol.md`, each checking what a
//! server does with valid input and with every violation, through a raw peer that speaks the protocol's frames
//! directly (gRPC calls with message bytes as given, the side channel frame by frame).
//!
//! The server under test serves the demo service `shmgrpc.demo.v1.Blob` (`crates/shmgrpc-demo/proto/blob.proto`;
//! Echo returns its request, Upload answers the payload's length and crc32) with shmgrpc, as gRPC's interop tests
//! ask for their `TestService`. A third implementation points `shmgrpc conformance --target ADDRESS` at its own
//! server and gets a report: one line per case with the section it checks, the rule, and what was seen.
//!
//! Cases that wait out a bound of the protocol (the 5 s handshake, the 2 s hold-back) take that long.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

pub mod fake;
pub mod peer;

mod cases;
mod client_cases;

pub use client_cases::ClientCase;
pub use peer::Target;

/// A case's check: `Ok` when the server did what the rule requires, else what it did instead.
pub type Check = fn(Target) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One rule of the protocol and the check of it.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    /// A stable name: `<area>.<what>`.
    pub id: &'static str,
    /// The section of docs/protocol.md the rule is in.
    pub section: &'static str,
    /// The rule, as the case checks it.
    pub rule: &'static str,
    /// The check.
    pub check: Check,
}

/// Every case, in the order of the spec's sections.
pub fn cases() -> Vec<Case> {
    cases::all()
}

/// What one case found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    /// The case's id.
    pub id: &'static str,
    /// The section of docs/protocol.md.
    pub section: &'static str,
    /// The rule.
    pub rule: &'static str,
    /// Whether the server followed it.
    pub passed: bool,
    /// What was seen instead, for a failure.
    pub detail: String,
    /// How long the case took, in milliseconds.
    pub millis: u128,
}

impl Outcome {
    /// The outcome of the case `(id, section, rule)` that started at `start` and ended with `result`.
    fn of(
        (id, section, rule): (&'static str, &'static str, &'static str),
        start: Instant,
        result: Result<(), String>,
    ) -> Outcome {
        Outcome {
            id,
            section,
            rule,
            passed: result.is_ok(),
            detail: result.err().unwrap_or_default(),
            millis: start.elapsed().as_millis(),
        }
    }
}

/// Runs the cases whose id starts with `only` (all without it) against the server at `target`, one after the
/// other, and reports each. A case that panics is a failure.
///
/// # Errors
///
/// The server cannot be reached at all.
pub async fn run(target: &str, only: Option<&str>) -> Result<Vec<Outcome>, String> {
    let t = Target::connect(target).await?;
    let mut out = Vec::new();
    for case in cases().into_iter().filter(|c| only.is_none_or(|p| c.id.starts_with(p))) {
        let start = Instant::now();
        let result = match tokio::spawn((case.check)(t.clone())).await {
            Ok(r) => r,
            Err(e) => Err(format!("the check panicked: {e}")),
        };
        out.push(Outcome::of((case.id, case.section, case.rule), start, result));
    }
    Ok(out)
}

/// Every client case.
pub fn client_cases() -> Vec<ClientCase> {
    client_cases::all()
}

/// Runs the client cases whose id starts with `only` (all without it): for each, a fake server follows the case's
/// script and `command` (run with `sh -c`, `{target}` replaced by the fake server's address) is the client under
/// test; see [`fake`] for what the command must do.
///
/// # Errors
///
/// A fake server could not start.
pub async fn run_client(command: &str, only: Option<&str>) -> Result<Vec<Outcome>, String> {
    let mut out = Vec::new();
    for case in client_cases::all().into_iter().filter(|c| only.is_none_or(|p| c.id.starts_with(p))) {
        let start = Instant::now();
        let fake = fake::Fake::start(case.script).await?;
        let cmd = command.replace("{target}", &fake.target);
        let ran = peer::blocking(move || run_bounded(&cmd, CLIENT_LIMIT)).await;
        let result = match ran {
            Ok(o) => {
                let checked = (case.check)(o.status.success(), &fake);
                checked.map_err(|e| {
                    let err = String::from_utf8_lossy(&o.stderr);
                    let tail: String = err.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                    if o.status.success() || tail.is_empty() { e } else { format!("{e} (client: {tail})") }
                })
            }
            Err(e) => Err(format!("the client command did not run: {e}")),
        };
        out.push(Outcome::of((case.id, case.section, case.rule), start, result));
    }
    Ok(out)
}

/// How long a client command may take for one case.
const CLIENT_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `cmd` with `sh -c`, killing it after `limit`.
fn run_bounded(cmd: &str, limit: std::time::Duration) -> std::io::Result<std::process::Output> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output()
}
