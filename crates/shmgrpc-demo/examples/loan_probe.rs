//! Probe: the same loaned payload echoed again and again, to isolate the transport cost from writing and checking.
//! `cargo run --release -p shmgrpc --example loan_probe -- SIZE_BYTES CALLS`
use shmgrpc_demo::{Addr, BlobClient, BlobServer, BlobService, Payload};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size: usize = args.next().map_or(Ok(1 << 28), |s| s.parse())?;
    let calls: usize = args.next().map_or(Ok(200), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("g.sock");
    let shm = shmgrpc::ShmServer::new(shmgrpc::ServerConfig::default())?;
    let layer = shm.layer();
    let addrs = vec![Addr::Unix(path.clone())];
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = shmgrpc_demo::serve(
            &addrs,
            Some(layer),
            move |_| {
                let _ = tx.send(());
            },
            std::future::pending(),
        )
        .await;
    });
    rx.await?;
    let _ = BlobServer::new(BlobService);
    let ch = shmgrpc::ShmChannel::connect(&format!("unix:{}", path.display())).await?;
    let mut c = BlobClient::new(ch.clone());
    let mut loan = ch.loan(size);
    loan.fill(3);
    let data = loan.freeze();
    let mut t = Vec::new();
    for _ in 0..calls {
        let p = Payload { data: data.clone(), crc32: 0, note: String::new() };
        let t0 = std::time::Instant::now();
        let r = c.echo(p).await?.into_inner();
        t.push(t0.elapsed());
        assert!(size < 65536 || r.data.as_ptr() == data.as_ptr(), "copied");
    }
    t.sort();
    println!("{size} bytes: median {:?} p10 {:?}", t[t.len() / 2], t[t.len() / 10]);
    Ok(())
}
