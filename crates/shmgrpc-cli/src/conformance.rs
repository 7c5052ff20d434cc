//! `shmgrpc conformance`: runs the protocol's conformance suite (`conformance/`) against a server and prints a
//! report, one line per case (or JSON lines); exits with an error if any case failed.

use clap::Args as ClapArgs;

/// Arguments of `shmgrpc conformance`.
#[derive(ClapArgs)]
pub(crate) struct Args {
    /// The server under test (`unix:/path` or `host:port`); it must serve the demo service `shmgrpc.demo.v1.Blob`
    /// with shmgrpc (as `shmgrpc serve` does).
    #[arg(long, required_unless_present = "list")]
    target: Option<String>,
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
        return Ok(());
    }
    let target = a.target.expect("clap requires it without --list");
    let outcomes = shmgrpc_conformance::run(&target, a.only.as_deref()).await.map_err(anyhow::Error::msg)?;
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
