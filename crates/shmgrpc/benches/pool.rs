//! Pool micro-benchmarks: alloc + release per size class, and writing 20 MiB into a warm pool buffer (on one thread,
//! and through `shmgrpc::copy` with its helper threads), into a freshly created segment (with and without
//! prefaulting) and into heap memory (the `memcpy` floor).
#![allow(missing_docs)] // criterion_group! generates an undocumented public function.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shmgrpc::{Backend, Pool, PoolConfig, Segment, SegmentOptions};

const MIB: usize = 1 << 20;

fn alloc_release(c: &mut Criterion) {
    let pool = Pool::new(PoolConfig::default()).unwrap();
    let mut g = c.benchmark_group("alloc_release");
    for size in [64 << 10, MIB, 16 * MIB, 256 * MIB] {
        pool.preallocate(size, 1).unwrap();
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            b.iter(|| drop(black_box(pool.try_alloc(size).unwrap())))
        });
    }
    g.finish();
}

fn write_20mib(c: &mut Criterion) {
    let size = 20 * MIB;
    let src = vec![0xA5u8; size];
    let mut g = c.benchmark_group("write_20MiB");
    g.throughput(Throughput::Bytes(size as u64));
    g.sample_size(20);

    let mut heap = vec![0u8; size];
    g.bench_function("heap_memcpy", |b| {
        b.iter(|| {
            heap.copy_from_slice(black_box(&src));
            black_box(&heap);
        })
    });

    let pool = Pool::new(PoolConfig::default()).unwrap();
    pool.preallocate(size, 1).unwrap();
    g.bench_function("warm_pool_buffer", |b| {
        b.iter(|| {
            let mut lease = pool.try_alloc(size).unwrap();
            lease.copy_from_slice(black_box(&src));
            black_box(&lease);
        })
    });

    // The same write through `shmgrpc::copy`, shared with helper threads while the process has spare cores.
    g.bench_function("warm_pool_buffer_copy", |b| {
        b.iter(|| {
            let mut lease = pool.try_alloc(size).unwrap();
            shmgrpc::copy::copy(&mut lease, black_box(&src));
            black_box(&lease);
        })
    });

    for (name, opts) in [
        ("fresh_memfd", SegmentOptions::new(Backend::Memfd)),
        ("fresh_memfd_prefaulted", SegmentOptions::new(Backend::Memfd).prefault(true)),
        ("fresh_posix", SegmentOptions::new(Backend::Posix)),
        ("fresh_sysv", SegmentOptions::new(Backend::SysV)),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut seg = Segment::create(size, &opts).unwrap();
                seg.as_mut_slice().copy_from_slice(black_box(&src));
                black_box(&seg);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, alloc_release, write_20mib);
criterion_main!(benches);
