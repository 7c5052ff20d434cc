//! shmgrpc: gRPC over shared memory for tonic.
//!
//! Three layers, each usable on its own (see `ARCHITECTURE.md`):
//!
//! 1. [`segment`]: POSIX `shm_open`, sealed `memfd_create` and System V `shmget` segments behind one safe API.
//! 2. [`pool`]: a size-class allocator of shared-memory buffers, and [`attach`], the receiving side's cache of
//!    mapped peer segments.
//! 3. gRPC integration for tonic (feature `grpc`, on by default): [`ShmCodec`] (the transparent path),
//!    [`ShmChannel`] (client) and [`ShmServer`] with its [`ShmLayer`] (server); see [`client`], [`server`],
//!    [`codec`] and [`stats`].
//!
//! [`inventory`] lists and garbage-collects this machine's shmgrpc segments (`shmgrpc ls` / `shmgrpc gc`).
//!
//! # Vocabulary
//!
//! - A **lease** ([`Lease`]) is exclusive use of one pool buffer; dropping it returns the buffer to its pool.
//! - A **loan** ([`Loan`]) is a buffer the user writes a payload into and then sends without a copy.
//! - A **hold** is a peer's reference to one of our buffers: the session keeps the buffer's lease until the peer's
//!   release comes back (or the session ends). Holds are the only way a buffer is kept for a peer.
//!
//! # Features
//!
//! - `grpc` (default): the gRPC layer. Without it (`default-features = false`) the crate is the segment, pool,
//!   attach-cache and inventory layers, with no tonic, prost or hyper in its dependency tree.
//! - `metrics`: exports the gRPC layer's counters, gauges and latencies through the [`metrics`](https://docs.rs/metrics)
//!   facade, so a service's existing Prometheus or OpenTelemetry exporter picks them up (see [`stats`]).

pub mod attach;
pub mod cgroup;
pub mod copy;
pub mod error;
pub mod inventory;
mod pid;
pub mod pool;
pub mod segment;
mod sync;

#[cfg(feature = "grpc")]
mod body;
#[cfg(feature = "grpc")]
pub mod client;
#[cfg(feature = "grpc")]
pub mod codec;
#[cfg(feature = "grpc")]
mod config;
#[cfg(feature = "grpc")]
pub mod embed;
#[cfg(feature = "grpc")]
mod handshake;
#[cfg(feature = "grpc")]
mod io;
#[cfg(feature = "grpc")]
mod parts;
#[cfg(feature = "grpc")]
pub mod protocol;
#[cfg(feature = "grpc")]
pub mod server;
#[cfg(feature = "grpc")]
mod session;
#[cfg(feature = "grpc")]
mod side_channel;
#[cfg(feature = "grpc")]
pub mod stats;

pub use attach::AttachCache;
pub use error::{Error, Result};
pub use pool::{Lease, OnExhausted, Pool, PoolConfig, PoolStats};
pub use segment::{Backend, PeerSegment, Segment, SegmentHandle, SegmentOptions};

#[cfg(feature = "grpc")]
pub use client::ShmChannel;
#[cfg(feature = "grpc")]
pub use codec::ShmCodec;
#[cfg(feature = "grpc")]
pub use config::{ClientConfig, ServerConfig};
#[cfg(feature = "grpc")]
pub use server::{ShmLayer, ShmServer};
#[cfg(feature = "grpc")]
pub use session::{Loan, SessionStats, is_shared};
#[cfg(feature = "grpc")]
pub use stats::{Fallback, TransferStats};

// Plumbing, public only for this workspace's tests, fuzz targets and hostile test peers that speak the wire protocol
// directly. Hidden from the docs and not part of the API: it may change in any release.
#[doc(hidden)]
pub mod fdpass;
#[cfg(feature = "grpc")]
#[doc(hidden)]
pub mod proto;
#[cfg(feature = "grpc")]
#[doc(hidden)]
pub mod wire;

/// Entry points for the fuzz targets in `fuzz/`; built only under `cfg(fuzzing)` (set by `cargo fuzz`), never in
/// a release.
#[cfg(all(fuzzing, feature = "grpc"))]
#[doc(hidden)]
pub mod __fuzz {
    /// Runs gRPC message bytes from a peer through the receiving body's scanner in chunks of `chunk` bytes;
    /// returns what it hands on, which must be the input unchanged.
    pub fn hold_back_scan(data: &[u8], chunk: usize) -> Vec<u8> {
        crate::body::scan_all(data, chunk)
    }

    /// Sends `data` over a socket pair, a memfd attached to the write of `data[split..]` when `fd` is set, and
    /// reads side-channel frames until the end or the first error; returns how many frames were read.
    pub fn read_side_frames(data: &[u8], split: usize, fd: bool) -> usize {
        crate::side_channel::read_all_for_fuzzing(data, split, fd)
    }
}

/// The README's examples, compiled and run as doctests.
#[cfg(all(doctest, feature = "grpc"))]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
