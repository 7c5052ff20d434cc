//! A service exporting Prometheus metrics shows shmgrpc's counters: installs `metrics-exporter-prometheus` as the
//! process's `metrics` recorder (as a service would, usually with its HTTP listener), serves the demo service with
//! shmgrpc on a Unix socket, makes a few calls through a `ShmChannel`, and prints the `shmgrpc_*` lines of the
//! Prometheus text a scrape would get.
//!
//! ```text
//! cargo run -p shmgrpc-demo --example prometheus
//! ```
//!
//! Needs the `metrics` feature of `shmgrpc` (this crate's dev-dependency turns it on).

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use shmgrpc::{ServerConfig, ShmChannel, ShmServer};
use shmgrpc_demo::{Addr, BlobClient, DownloadRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let dir = tempfile::tempdir()?;
    let addr: Addr = format!("unix:{}", dir.path().join("grpc.sock").display()).parse()?;
    let shm = ShmServer::new(ServerConfig::default())?;
    let layer = shm.layer();
    let (stop_tx, server) = shmgrpc_demo::spawn(vec![addr.clone()], Some(layer)).await?;

    let channel = ShmChannel::connect(&addr.to_string()).await?;
    let mut client = BlobClient::new(channel.clone()).max_decoding_message_size(usize::MAX);
    for seed in 0..3 {
        shmgrpc_demo::verify(&client.echo(shmgrpc_demo::payload(4 << 20, seed)).await?.into_inner())?;
        shmgrpc_demo::verify(&client.echo(shmgrpc_demo::payload(1024, seed)).await?.into_inner())?;
    }
    let d = client.download(DownloadRequest { size: 8 << 20, seed: 9, count: 1 }).await?.into_inner();
    shmgrpc_demo::verify(&d)?;
    drop(d);
    // Releases travel on the side channel: give the last one a moment so the release histogram has it.
    tokio::time::sleep(Duration::from_millis(50)).await;

    for line in prometheus.render().lines().filter(|l| l.starts_with("shmgrpc_")) {
        println!("{line}");
    }
    println!("# channel: {:?}", channel.stats());
    println!("# server:  {:?}", shm.stats());

    drop((client, channel));
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}
