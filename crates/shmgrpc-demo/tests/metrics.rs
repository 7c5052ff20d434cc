//! A service that exports Prometheus metrics through `metrics-exporter-prometheus` shows shmgrpc's counters: the
//! same figures as `ShmChannel::stats` / `ShmServer::stats`, labelled by side, direction, path and fallback reason.
//!
//! One test in its own binary: the `metrics` recorder is global to the process, and no other test may move it.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use shmgrpc::{ClientConfig, Fallback, ServerConfig, ShmChannel, ShmServer};
use shmgrpc_demo::{Addr, BlobClient};

/// The value of the Prometheus sample `name{labels}` (labels in the exporter's order, which is the order given).
fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_shows_shmgrpc_counters() {
    let prometheus = PrometheusBuilder::new().install_recorder().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let addr: Addr = format!("unix:{}", dir.path().join("grpc.sock").display()).parse().unwrap();
    let shm = ShmServer::new(ServerConfig::default()).unwrap();
    let layer = shm.layer();
    let (stop_tx, server) = shmgrpc_demo::spawn(vec![addr.clone()], Some(layer)).await.unwrap();

    let channel = ShmChannel::connect(&addr.to_string()).await.unwrap();
    assert!(channel.is_shared_memory(), "{:?}", channel.fallback());
    let mut client = BlobClient::new(channel.clone()).max_decoding_message_size(usize::MAX);
    for seed in 0..3 {
        shmgrpc_demo::verify(&client.echo(shmgrpc_demo::payload(1 << 20, seed)).await.unwrap().into_inner()).unwrap();
    }
    shmgrpc_demo::verify(&client.echo(shmgrpc_demo::payload(100, 7)).await.unwrap().into_inner()).unwrap();
    // A plain channel with shared memory off: its messages count inline, with no fallback (nothing was tried).
    let plain =
        ShmChannel::connect_with(&addr.to_string(), ClientConfig::default().shared_memory(false)).await.unwrap();
    let mut pc = BlobClient::new(plain.clone()).max_decoding_message_size(usize::MAX);
    shmgrpc_demo::verify(&pc.echo(shmgrpc_demo::payload(1 << 20, 8)).await.unwrap().into_inner()).unwrap();

    // Releases travel on the side channel after the call; wait (asynchronously) until the server has them all.
    let start = std::time::Instant::now();
    while shm.session_stats().holds > 0 || channel.session_stats().holds > 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "releases never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let text = prometheus.render();
    let m =
        |name: &str, labels: &str| sample(&text, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}}:\n{text}"));
    // The shared-memory channel: 3 requests out through shared memory, 1 inline (below the threshold) ...
    let (ch, srv) = (channel.stats(), shm.stats());
    assert_eq!((ch.shm_sent, ch.inline_sent), (3, 1), "{ch:?}");
    assert_eq!(m("shmgrpc_messages_total", r#"side="client",direction="sent",path="shm""#), 3.0);
    assert_eq!(m("shmgrpc_messages_total", r#"side="client",direction="received",path="shm""#), 3.0);
    assert_eq!(
        m("shmgrpc_message_bytes_total", r#"side="client",direction="sent",path="shm""#),
        ch.shm_sent_bytes as f64
    );
    // ... plus the plain channel's one message each way (counted as client messages, inline).
    assert_eq!(m("shmgrpc_messages_total", r#"side="client",direction="sent",path="inline""#), 2.0);
    assert_eq!(m("shmgrpc_messages_total", r#"side="client",direction="received",path="inline""#), 2.0);
    // The server's side of the same calls.
    assert_eq!((srv.shm_received, srv.shm_sent, srv.inline_received), (3, 3, 2), "{srv:?}");
    assert_eq!(m("shmgrpc_messages_total", r#"side="server",direction="received",path="shm""#), 3.0);
    assert_eq!(m("shmgrpc_messages_total", r#"side="server",direction="sent",path="shm""#), 3.0);
    assert_eq!(srv.fallbacks_total() + ch.fallbacks_total() + plain.stats().fallbacks_total(), 0);
    assert_eq!(plain.stats().fallback(Fallback::PeerLacksShmgrpc), 0);
    // One session each side; the pool gauges and both latency histograms are there.
    assert_eq!(m("shmgrpc_sessions", r#"side="client""#), 1.0);
    assert_eq!(m("shmgrpc_sessions", r#"side="server""#), 1.0);
    assert!(m("shmgrpc_pool_bytes", r#"state="idle""#) > 0.0, "{text}");
    assert!(text.contains("shmgrpc_release_seconds"), "{text}");
    assert!(text.contains("shmgrpc_registration_seconds"), "{text}");

    drop((client, channel, pc, plain));
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
