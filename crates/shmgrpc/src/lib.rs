//! shmgrpc: gRPC over shared memory for tonic.
//!
//! Three layers, each usable on its own (see `ARCHITECTURE.md`):
//!
//! 1. [`segment`]: POSIX `shm_open`, sealed `memfd_create` and System V `shmget` segments behind one safe API.
//! 2. [`pool`]: a size-class allocator of shared-memory buffers, and [`attach`], the receiving side's cache of
//!    mapped peer segments.
//! 3. gRPC integration for tonic: [`ShmCodec`] (the transparent path), [`ShmChannel`] (client) and [`ShmServer`]
//!    with its [`ShmLayer`] (server); see [`client`], [`server`] and [`codec`].
//!
//! [`inventory`] lists and garbage-collects this machine's shmgrpc segments (`shmgrpc ls` / `shmgrpc gc`), and
//! [`fdpass`] moves descriptors between processes.

pub mod attach;
mod body;
pub mod client;
pub mod codec;
pub mod demo;
pub mod error;
pub mod fdpass;
mod handshake;
pub mod inventory;
mod io;
mod parts;
pub mod pool;
pub mod proto;
pub mod protocol;
pub mod segment;
pub mod server;
mod session;
pub mod stats;
pub mod wire;
pub use attach::AttachCache;
pub use client::{ClientConfig, ShmChannel};
pub use codec::ShmCodec;
pub use error::{Error, Result};
pub use pool::{Lease, OnExhausted, Pool, PoolConfig, PoolStats};
pub use segment::{Backend, PeerSegment, Segment, SegmentHandle, SegmentOptions};
pub use server::{ServerConfig, ShmLayer, ShmServer};
pub use session::{Loan, SessionStats, is_shared};

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
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
        crate::session::side_channel::read_all_for_fuzzing(data, split, fd)
    }
}

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
