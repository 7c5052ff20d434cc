//! Server and client in one process over a Unix socket: three 20 MiB echoes and a download through shared
//! memory, then the transfer counters and the server pool. `cargo run --release -p shmgrpc --example smoke`
use shmgrpc_demo::{BlobClient, BlobServer, BlobService, DownloadRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("grpc.sock");
    let shm = shmgrpc::ShmServer::new(shmgrpc::ServerConfig::default())?;
    let listener = tokio::net::UnixListener::bind(&path)?;
    let layer = shm.layer();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(BlobServer::new(BlobService))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await
            .unwrap();
    });
    let ch = shmgrpc::ShmChannel::connect(&format!("unix:{}", path.display())).await?;
    println!("shared memory: {} fallback {:?}", ch.is_shared_memory(), ch.fallback());
    let mut c = BlobClient::new(ch);
    for i in 0..3 {
        let p = shmgrpc_demo::payload(20 << 20, i);
        let t = std::time::Instant::now();
        let r = c.echo(p).await?.into_inner();
        shmgrpc_demo::verify(&r)?;
        println!("echo {} bytes in {:?}, shared {}", r.data.len(), t.elapsed(), shmgrpc::is_shared(&r.data));
    }
    let d = c.download(DownloadRequest { size: 1 << 20, seed: 3, count: 0 }).await?.into_inner();
    shmgrpc_demo::verify(&d)?;
    println!("{:?}", shmgrpc::stats::snapshot());
    println!("server pool {}", shm.pool().stats());
    Ok(())
}
