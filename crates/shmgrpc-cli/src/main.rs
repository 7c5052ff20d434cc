//! The `shmgrpc` command: `pool-demo` (moves a payload between two processes through the pool), and `ls` / `gc`
//! for this machine's shmgrpc segments (our `ipcs` / `ipcrm`).

mod demo;
mod segments;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shmgrpc", version, about = "gRPC over shared memory: demo, segment listing and cleanup")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Move a payload between two processes through a shared-memory pool, side by side with a Unix socket.
    PoolDemo(demo::Args),
    /// The child side of `pool-demo` (started by it).
    #[command(hide = true)]
    PoolDemoChild(demo::ChildArgs),
    /// List this machine's shmgrpc segments: backend, creator pid (alive or dead), size, age.
    Ls(segments::LsArgs),
    /// Remove segments whose creator is dead.
    Gc(segments::GcArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::PoolDemo(a) => demo::run(a),
        Command::PoolDemoChild(a) => demo::child(a),
        Command::Ls(a) => segments::ls(a),
        Command::Gc(a) => segments::gc(a),
    }
}
