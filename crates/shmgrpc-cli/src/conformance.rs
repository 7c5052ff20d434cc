//! `shmgrpc conformance`: runs the protocol's conformance suite (`conformance/`) against a server and prints a
//! report, one line per case (or JSON lines); exits with an error if any case failed.

use clap::Args as ClapArgs;

/// Arguments of `shmgrpc conformance`.
#[derive(ClapArgs)]
pub(crate) struct Args {
    /// The server under test (`unix:/path` or `host:port`); it must serve the demo service `shmgrpc.demo.v1.Blob`
    /// with shmgrpc (as `shmgrpc serve` does).
    #[arg(long, required_unless_present_any = ["list", "client"], conflicts_with = "client")]
    target: Option<String>,
    /// Check a client instead: this command (run with `sh -c`, `{target}` replaced by the address of a scripted
    /// fake server) must call `shmgrpc.demo.v1.Blob/Echo` twice with 1 MiB payloads whose crc32 field is set,
    /// check the replies, and exit 0 (for example `shmgrpc call --target {target} --size 1MiB --repeat 2`).
    #[arg(long)]
    client: Option<String>,
    /// Run only the cases whose id starts with this (for example `handshake.` or `reference.echo`).
    #[arg(long)]
    only: Option<String>,
    /// One JSON object per case on stdout: id, section, rule, passed, detail, millis.
    #[arg(long)]
    json: bool,
    /// List the cases (id, section, rule) and exit.
    #[arg(long)]
    list: bool,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    if a.list {
        for c in shmgrpc_conformance::cases() {
            println!("{:<32} {:<4} {}", c.id, c.section, c.rule);
        }
        for c in shmgrpc_conformance::client_cases() {
            println!("{:<32} {:<4} {}", c.id, c.section, c.rule);
        }
        return Ok(());
    }
    let outcomes = match (a.client, a.target) {
        (Some(cmd), _) => shmgrpc_conformance::run_client(&cmd, a.only.as_deref()).await,
        (None, Some(target)) => shmgrpc_conformance::run(&target, a.only.as_deref()).await,
        (None, None) => unreachable!("clap requires a target or a client"),
    }
    .map_err(anyhow::Error::msg)?;
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    for o in &outcomes {
        if a.json {
            println!("{}", serde_json::to_string(o)?);
        } else {
            let mark = if o.passed { "pass" } else { "FAIL" };
            println!("{mark} {:<32} {:<4} {:>6} ms  {}", o.id, o.section, o.millis, o.rule);
            if !o.passed {
                println!("     {}", o.detail);
            }
        }
    }
    if !a.json {
        println!("{} of {} cases passed", outcomes.len() - failed, outcomes.len());
    }
    anyhow::ensure!(failed == 0, "{failed} conformance case(s) failed");
    Ok(())
}
