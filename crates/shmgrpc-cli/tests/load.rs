//! Load: 64 concurrent clients, each with its own connection, session and pool, calling with random sizes on both
//! sides of the threshold and random methods; every payload is checksummed. Afterwards nothing is held anywhere and
//! the pools stayed within their budgets.

mod common;

use common::{client, eventually, serve_here};
use shmgrpc::{ClientConfig, Pool, PoolConfig, ServerConfig, ShmChannel, ShmServer};
use shmgrpc_demo::DownloadRequest;

const CLIENTS: usize = 64;
const CALLS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_with_checksummed_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    let server_pool = Pool::new(PoolConfig::default().budget(1 << 30)).unwrap();
    let shm = ShmServer::new(ServerConfig::default().pool(server_pool.clone())).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    let target = format!("unix:{}", sock.display());

    let mut tasks = Vec::new();
    let mut pools = Vec::new();
    for n in 0..CLIENTS {
        let pool = Pool::new(PoolConfig::default().budget(64 << 20)).unwrap();
        pools.push(pool.clone());
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let ch = ShmChannel::connect_with(&target, ClientConfig::default().pool(pool)).await.unwrap();
            assert!(ch.is_shared_memory());
            let mut c = client(&ch);
            let mut seed = 0x2545_f491u32 ^ (n as u32).wrapping_mul(0x9e37_79b9);
            let mut shared = 0;
            for i in 0..CALLS {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                // 1 KiB .. 4 MiB, log-uniform: about half below the 64 KiB threshold.
                let size = 1024usize << (seed % 13);
                let size = size + (seed as usize >> 13) % size;
                let size = size.min(4 << 20);
                match (seed >> 8) % 4 {
                    0 => {
                        let r = c.echo(shmgrpc_demo::payload(size, seed)).await.unwrap().into_inner();
                        shmgrpc_demo::verify(&r).unwrap();
                        assert_eq!(r.data.len(), size);
                        shared += usize::from(shmgrpc::is_shared(&r.data));
                    }
                    1 => {
                        let p = shmgrpc_demo::payload(size, seed);
                        let d = c.upload(p.clone()).await.unwrap().into_inner();
                        assert_eq!((d.len, d.crc32), (size as u64, p.crc32), "client {n} call {i}");
                    }
                    2 => {
                        let r = c
                            .download(DownloadRequest { size: size as u64, seed, count: 1 })
                            .await
                            .unwrap()
                            .into_inner();
                        shmgrpc_demo::verify(&r).unwrap();
                        assert_eq!(r.data.len(), size);
                    }
                    _ => {
                        let mut loan = ch.loan(size);
                        shmgrpc_demo::fill_pattern(&mut loan, seed);
                        let crc32 = crc32fast::hash(&loan);
                        let p = shmgrpc_demo::Payload { data: loan.freeze(), crc32, note: format!("{n}/{i}") };
                        let r = c.echo(p).await.unwrap().into_inner();
                        shmgrpc_demo::verify(&r).unwrap();
                        assert_eq!(r.note, format!("{n}/{i}"));
                    }
                }
            }
            (ch, shared)
        }));
    }
    let mut channels = Vec::new();
    for t in tasks {
        channels.push(t.await.unwrap());
    }
    let echoed_through_shm: usize = channels.iter().map(|(_, n)| n).sum();
    assert!(echoed_through_shm > 0, "no large echo went through shared memory");
    // Everything comes back while the sessions are still open (releases, not teardown).
    eventually("every client pool is idle", || pools.iter().all(|p| p.stats().is_idle())).await;
    eventually("the server pool is idle", || server_pool.stats().is_idle()).await;
    eventually("nothing is held across sessions", || {
        let s = shm.session_stats();
        s.holds == 0 && s.sent_back == 0
    })
    .await;
    assert_eq!(shm.sessions(), CLIENTS);
    for p in &pools {
        assert!(p.stats().bytes <= 64 << 20);
    }
    assert!(server_pool.stats().bytes <= 1 << 30);
    drop(channels);
    eventually("the sessions end with their channels", || shm.sessions() == 0).await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
