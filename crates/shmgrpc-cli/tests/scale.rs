//! Sessions at scale: a thousand sessions to one server need no more server threads than one, each moves a
//! payload through shared memory, and every descriptor is given back when they end.

mod common;

use common::{client, eventually, serve};
use shmgrpc::{ClientConfig, Pool, PoolConfig, ShmChannel};

fn count(dir: String) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sessions_need_no_more_server_threads_and_give_every_descriptor_back() {
    const SESSIONS: usize = 1000;
    // Each session costs a descriptor here and two in the server (which inherits this limit): raise the soft limit
    // to the hard one rather than depend on the shell's.
    let need = 4 * SESSIONS as u64 + 256;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    assert!(hard >= need, "this test needs {need} descriptors; the hard limit is {hard}");
    if limit.current.is_some_and(|soft| soft < need) {
        let raised = rustix::process::Rlimit {
            current: Some(need.max(limit.current.unwrap_or(0)).min(hard)),
            maximum: limit.maximum,
        };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, raised).unwrap();
    }
    let srv = serve(&[]).await;
    let pid = srv.child.id();
    let threads = || count(format!("/proc/{pid}/task"));
    let fds = || count(format!("/proc/{pid}/fd"));
    let fds_before = fds();
    // One pool for every channel of this process, as a service with many channels would have.
    let pool = Pool::new(PoolConfig::default()).unwrap();
    let config = ClientConfig::default().pool(pool.clone());

    let one = ShmChannel::connect_with(&srv.unix, config.clone()).await.unwrap();
    let r = client(&one).echo(shmgrpc_demo::payload(1 << 20, 0)).await.unwrap().into_inner();
    assert!(shmgrpc::is_shared(&r.data));
    drop(r);
    let threads_one = threads();

    let mut channels = vec![one];
    for _ in 1..SESSIONS {
        channels.push(ShmChannel::connect_with(&srv.unix, config.clone()).await.unwrap());
    }
    // Each session moves 1 MiB through shared memory, 50 at a time.
    for batch in channels.chunks(50) {
        let mut calls = Vec::new();
        for (i, ch) in batch.iter().enumerate() {
            assert!(ch.is_shared_memory(), "{:?}", ch.fallback());
            let mut c = client(ch);
            calls.push(tokio::spawn(async move {
                let r = c.echo(shmgrpc_demo::payload(1 << 20, i as u32)).await.unwrap().into_inner();
                shmgrpc_demo::verify(&r).unwrap();
                shmgrpc::is_shared(&r.data)
            }));
        }
        for call in calls {
            assert!(call.await.unwrap(), "a 1 MiB echo went inline");
        }
    }
    let threads_many = threads();
    let fds_many = fds();
    println!(
        "server: {threads_one} threads with one session, {threads_many} with {SESSIONS}; descriptors {fds_before} \
         before, {fds_many} with {SESSIONS} sessions"
    );
    // Tokio's idle blocking threads may have ended meanwhile, never grown with the sessions.
    assert!(
        threads_many <= threads_one,
        "{threads_many} server threads with {SESSIONS} sessions, {threads_one} with one"
    );
    assert!(fds_many >= fds_before + SESSIONS, "the sessions were not all open at once");

    drop(channels);
    eventually("the server closed every session's descriptors", || fds() <= fds_before).await;
    eventually("every buffer came back to the pool", || pool.stats().is_idle()).await;
}
