//! Probe: 1 KiB echoes through shmgrpc and through plain tonic over Unix sockets in one process, interleaved call
//! by call so both see the same machine. `cargo run --release -p shmgrpc --example small_probe -- CALLS`
use shmgrpc_demo::{Addr, BlobClient};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let calls: usize = std::env::args().nth(1).map_or(Ok(5000), |s| s.parse())?;
    let only = std::env::args().nth(2);
    let dir = tempfile::tempdir()?;
    let shm = shmgrpc::ShmServer::new(shmgrpc::ServerConfig::default())?;
    let mut clients = Vec::new();
    for (name, layer) in [("shm", Some(shm.layer())), ("plain", None)] {
        let path = dir.path().join(format!("{name}.sock"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let addrs = vec![Addr::Unix(path.clone())];
        tokio::spawn(async move {
            let ready = move |_: &[Addr]| {
                let _ = tx.send(());
            };
            let _ = shmgrpc_demo::serve(&addrs, layer, ready, std::future::pending()).await;
        });
        rx.await?;
        let config = shmgrpc::ClientConfig::default().shared_memory(name == "shm");
        let ch = shmgrpc::ShmChannel::connect_with(&format!("unix:{}", path.display()), config).await?;
        clients.push((name, BlobClient::new(ch), Vec::with_capacity(calls)));
    }
    let p = shmgrpc_demo::payload(1024, 1);
    for _ in 0..calls {
        for (name, c, t) in clients.iter_mut() {
            if only.as_deref().is_some_and(|o| o != *name) {
                continue;
            }
            let t0 = std::time::Instant::now();
            c.echo(p.clone()).await?;
            t.push(t0.elapsed());
        }
    }
    for (name, _, t) in clients.iter_mut() {
        if t.is_empty() {
            continue;
        }
        t.sort();
        println!("{name:>5}: median {:?}  p10 {:?}  p90 {:?}", t[t.len() / 2], t[t.len() / 10], t[t.len() * 9 / 10]);
    }
    Ok(())
}
