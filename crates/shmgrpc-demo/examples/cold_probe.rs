//! Probe: what a fresh client process pays on its first calls, against a server that is already running
//! (`shmgrpc serve`). Run it as a new process each time, alternating modes:
//!
//! `cargo run --release -p shmgrpc --example cold_probe -- unix:/tmp/g.sock shm|plain first|burst`
//!
//! - `first`: the first 20 MiB echo (transport time: from the call to the reply), then four warm ones.
//! - `burst`: the first stream of the process: a bidirectional `EchoStream` of 30 x 4 MiB frames, all sent at once,
//!   from the call to the last reply; then the same burst again, warm.
//!
//! Every payload is written before the call and every reply is checked (crc32) after it.
use std::time::Instant;

use shmgrpc_demo::{BlobClient, Payload, payload, verify};

async fn burst(c: &mut BlobClient<shmgrpc::ShmChannel>) -> Result<f64, Box<dyn std::error::Error>> {
    let frames: Vec<Payload> = (0..30).map(|i| payload(4 << 20, i)).collect();
    let t = Instant::now();
    let mut replies = c.echo_stream(tokio_stream::iter(frames)).await?.into_inner();
    let mut n = 0;
    while let Some(r) = replies.message().await? {
        verify(&r)?;
        n += 1;
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert_eq!(n, 30, "every frame comes back");
    Ok(ms)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_else(|| "unix:/tmp/g.sock".into());
    let shm = args.next().as_deref() != Some("plain");
    let what = args.next().unwrap_or_else(|| "first".into());
    let config = shmgrpc::ClientConfig::default().shared_memory(shm);
    let ch = shmgrpc::ShmChannel::connect_with(&target, config).await?;
    assert_eq!(ch.is_shared_memory(), shm, "{:?}", ch.fallback());
    let mut c = BlobClient::new(ch).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    let mode = if shm { "shm" } else { "plain" };
    if what == "burst" {
        let cold = burst(&mut c).await?;
        let warm = burst(&mut c).await?;
        println!("{mode} burst 30 x 4 MiB: cold {cold:.1} ms, warm {warm:.1} ms");
    } else {
        let mut times = Vec::new();
        for i in 0..5 {
            let p = payload(20 << 20, i);
            let t = Instant::now();
            let r = c.echo(p).await?.into_inner();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            verify(&r)?;
        }
        let warm = times[1..].iter().copied().fold(f64::MAX, f64::min);
        println!("{mode} first 20 MiB echo: cold {:.1} ms, best warm {warm:.1} ms", times[0]);
    }
    Ok(())
}
