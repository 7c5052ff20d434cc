//! Hot-path micro-benchmarks of the gRPC layer.
//!
//! * `encode_20MiB`: a 20 MiB `Payload` encoded straight into a warm pool buffer on one thread, and through
//!   `shmgrpc::copy::Writer` (what the codec does above the threshold: the field's copy shared with helper threads),
//!   against encoding into a fresh `Vec` (what plain prost does into tonic's buffer).
//! * `decode_20MiB`: decoding it from `Bytes` over a read-only peer mapping (zero-copy `bytes` field) against from
//!   a heap `BytesMut` (tonic's path after it has copied the frames).
//! * `release`: a lease back to its pool; a loan frozen into `Bytes` and dropped.
//! * `round_trip`: echo through a real `ShmServer` and `ShmChannel` over a Unix socket in this process, against
//!   plain tonic over the same kind of socket, at 1 KiB and 20 MiB.
#![allow(missing_docs)] // criterion_group! generates an undocumented public function.

use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use shmgrpc::{PeerSegment, Pool, PoolConfig, Segment, SegmentOptions, ShmChannel, ShmServer};
use shmgrpc_demo::{Addr, BlobClient, Payload};

const SIZE: usize = 20 << 20;

fn encode(c: &mut Criterion) {
    let p = shmgrpc_demo::payload(SIZE, 1);
    let len = p.encoded_len();
    let pool = Pool::new(PoolConfig::default()).unwrap();
    pool.preallocate(len, 1).unwrap();
    let mut g = c.benchmark_group("encode_20MiB");
    g.throughput(Throughput::Bytes(len as u64));
    g.sample_size(20);
    g.bench_function("into_pool_buffer", |b| {
        b.iter(|| {
            let mut lease = pool.try_alloc(len).unwrap();
            let mut dst: &mut [u8] = &mut lease;
            black_box(&p).encode(&mut dst).unwrap();
            black_box(&lease);
        })
    });
    // As the session encodes: through `shmgrpc::copy::Writer`, which shares the field's copy with helper threads.
    g.bench_function("into_pool_buffer_with_copy_helpers", |b| {
        b.iter(|| {
            let mut lease = pool.try_alloc(len).unwrap();
            let mut dst = shmgrpc::copy::Writer::new(&mut lease);
            black_box(&p).encode(&mut dst).unwrap();
            black_box(&lease);
        })
    });
    g.bench_function("into_fresh_vec", |b| b.iter(|| black_box(black_box(&p).encode_to_vec())));
    g.finish();
}

/// `Bytes` owner over a peer mapping, as the codec builds it.
struct View(Arc<PeerSegment>, usize);
impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        &self.0.as_slice()[..self.1]
    }
}

fn decode(c: &mut Criterion) {
    let encoded = shmgrpc_demo::payload(SIZE, 2).encode_to_vec();
    let mut seg = Segment::create(encoded.len(), &SegmentOptions::default()).unwrap();
    seg.as_mut_slice().copy_from_slice(&encoded);
    let peer = Arc::new(PeerSegment::open(seg.share().unwrap(), encoded.len() as u64).unwrap());
    let mut g = c.benchmark_group("decode_20MiB");
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.sample_size(20);
    g.bench_function("from_mapping_zero_copy", |b| {
        b.iter(|| {
            let bytes = Bytes::from_owner(View(peer.clone(), encoded.len()));
            black_box(Payload::decode(bytes).unwrap());
        })
    });
    let heap = BytesMut::from(&encoded[..]);
    g.bench_function("from_heap_buffer", |b| b.iter(|| black_box(Payload::decode(heap.clone().freeze()).unwrap())));
    g.finish();
}

fn release(c: &mut Criterion) {
    let pool = Pool::new(PoolConfig::default()).unwrap();
    pool.preallocate(SIZE, 1).unwrap();
    let mut g = c.benchmark_group("release");
    g.bench_function("lease_drop", |b| {
        b.iter_batched(|| pool.try_alloc(SIZE).unwrap(), drop, criterion::BatchSize::SmallInput)
    });
    g.finish();
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (shm_sock, plain_sock) = (dir.path().join("shm.sock"), dir.path().join("plain.sock"));
    let shm = ShmServer::new(shmgrpc::ServerConfig::default()).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    for (sock, layer) in [(shm_sock.clone(), Some(shm.layer())), (plain_sock.clone(), None)] {
        let mut stopped = stopped.clone();
        let (ready, is_ready) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let done = async move {
                let _ = stopped.wait_for(|&s| s).await;
            };
            shmgrpc_demo::serve(&[Addr::Unix(sock)], layer, move |_| ready.send(()).unwrap(), done).await.unwrap();
        });
        is_ready.recv().unwrap();
    }
    let connect = |sock: &std::path::Path, shared: bool| {
        let target = format!("unix:{}", sock.display());
        rt.block_on(async move {
            let ch = ShmChannel::connect_with(&target, shmgrpc::ClientConfig::default().shared_memory(shared))
                .await
                .unwrap();
            BlobClient::new(ch).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX)
        })
    };
    let clients = [("shm", connect(&shm_sock, true)), ("plain_uds", connect(&plain_sock, false))];
    let mut g = c.benchmark_group("round_trip");
    g.sample_size(20);
    for size in [1024, SIZE] {
        let p = shmgrpc_demo::payload(size, 3);
        for (name, client) in &clients {
            g.bench_with_input(BenchmarkId::new(*name, size), &size, |b, _| {
                b.iter(|| {
                    let mut c = client.clone();
                    let p = p.clone();
                    rt.block_on(async move { black_box(c.echo(p).await.unwrap()) })
                })
            });
        }
    }
    g.finish();
    drop(clients);
    let _ = stop.send(true);
    drop(shm);
}

criterion_group!(benches, encode, decode, release, round_trip);
criterion_main!(benches);
