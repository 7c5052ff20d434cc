//! The `shmgrpc` command: `bench` (shmgrpc against plain gRPC, side by side), `serve` / `call` (the demo blob
//! service), `pool-demo` (the pool alone between two processes), `ls` / `gc` for this machine's shmgrpc segments
//! (our `ipcs` / `ipcrm`), and `conformance` (the protocol's conformance suite against a server).

mod bench;
mod conformance;
mod grpc;
mod plot;
mod pool_demo;
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
    /// Benchmark shmgrpc against plain gRPC over TCP and a Unix socket (starts its own server processes).
    Bench(bench::BenchArgs),
    /// Serve the demo blob service.
    Serve(grpc::ServeArgs),
    /// Call the demo blob service, checksumming every reply.
    Call(grpc::CallArgs),
    /// Move a payload between two processes through a shared-memory pool, side by side with a Unix socket.
    PoolDemo(pool_demo::Args),
    /// The child side of `pool-demo` (started by it).
    #[command(hide = true)]
    PoolDemoChild(pool_demo::ChildArgs),
    /// List this machine's shmgrpc segments: backend, creator pid (alive or dead), size, age.
    Ls(segments::LsArgs),
    /// Remove segments whose creator is dead.
    Gc(segments::GcArgs),
    /// Check a server against the protocol (docs/protocol.md), rule by rule: the conformance suite.
    Conformance(conformance::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Bench(a) => bench::run(a).await,
        Command::Serve(a) => grpc::serve(a).await,
        Command::Call(a) => grpc::call(a).await,
        Command::PoolDemo(a) => pool_demo::run(a),
        Command::PoolDemoChild(a) => pool_demo::child(a),
        Command::Ls(a) => segments::ls(a),
        Command::Gc(a) => segments::gc(a),
        Command::Conformance(a) => conformance::run(a).await,
    }
}
