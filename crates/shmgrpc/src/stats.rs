//! Process-wide transfer counters: what went through shared memory, what went inline and why.
//!
//! The codec has no connection context (tonic creates it with `Default::default()`), so the counters are global
//! to the process; read them with [`snapshot`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a message that could have gone through shared memory went inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fallback {
    /// The peer does not speak shmgrpc (plain gRPC server: discovery answered UNIMPLEMENTED).
    PeerLacksShmgrpc,
    /// Discovery failed for another reason (an error status other than UNIMPLEMENTED, or no answer in time).
    DiscoveryFailed,
    /// The peer speaks shmgrpc, but no protocol version both sides support.
    UnsupportedVersion,
    /// The side channel could not be reached (another host, another mount namespace, socket gone).
    SideChannelUnreachable,
    /// The handshake on the side channel failed (refused, bad challenge, timeout).
    HandshakeFailed,
    /// The session ended (peer gone, side channel closed).
    SessionClosed,
    /// The pool had no buffer within its budget.
    PoolExhausted,
    /// The peer refused to map the segment (or it could not be shared).
    RegistrationFailed,
    /// The peer held as many bytes of ours as the in-flight window allows, for longer than the bounded wait.
    WindowFull,
}

impl Fallback {
    /// All reasons, in counter order.
    pub const ALL: [Fallback; 9] = [
        Fallback::PeerLacksShmgrpc,
        Fallback::DiscoveryFailed,
        Fallback::UnsupportedVersion,
        Fallback::SideChannelUnreachable,
        Fallback::HandshakeFailed,
        Fallback::SessionClosed,
        Fallback::PoolExhausted,
        Fallback::RegistrationFailed,
        Fallback::WindowFull,
    ];

    fn index(self) -> usize {
        Fallback::ALL.iter().position(|&f| f == self).expect("listed")
    }
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fallback::PeerLacksShmgrpc => "peer lacks shmgrpc",
            Fallback::DiscoveryFailed => "discovery failed",
            Fallback::UnsupportedVersion => "no common protocol version",
            Fallback::SideChannelUnreachable => "side channel unreachable",
            Fallback::HandshakeFailed => "handshake failed",
            Fallback::SessionClosed => "session closed",
            Fallback::PoolExhausted => "pool exhausted",
            Fallback::RegistrationFailed => "segment registration failed",
            Fallback::WindowFull => "in-flight window full",
        })
    }
}

struct Counters {
    shm_sent: AtomicU64,
    shm_sent_bytes: AtomicU64,
    shm_received: AtomicU64,
    shm_received_bytes: AtomicU64,
    inline_sent: AtomicU64,
    inline_sent_bytes: AtomicU64,
    inline_received: AtomicU64,
    inline_received_bytes: AtomicU64,
    bad_references: AtomicU64,
    bad_releases: AtomicU64,
    peer_refusals: AtomicU64,
    fallbacks: [AtomicU64; Fallback::ALL.len()],
}

static COUNTERS: Counters = Counters {
    shm_sent: AtomicU64::new(0),
    shm_sent_bytes: AtomicU64::new(0),
    shm_received: AtomicU64::new(0),
    shm_received_bytes: AtomicU64::new(0),
    inline_sent: AtomicU64::new(0),
    inline_sent_bytes: AtomicU64::new(0),
    inline_received: AtomicU64::new(0),
    inline_received_bytes: AtomicU64::new(0),
    bad_references: AtomicU64::new(0),
    bad_releases: AtomicU64::new(0),
    peer_refusals: AtomicU64::new(0),
    fallbacks: [const { AtomicU64::new(0) }; Fallback::ALL.len()],
};

/// A snapshot of the process's transfer counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Messages sent as a reference to shared memory, and their payload bytes.
    pub shm_sent: u64,
    /// Payload bytes of those messages.
    pub shm_sent_bytes: u64,
    /// Messages received as a reference.
    pub shm_received: u64,
    /// Payload bytes of those messages.
    pub shm_received_bytes: u64,
    /// Messages sent inline (through the gRPC stream).
    pub inline_sent: u64,
    /// Their bytes.
    pub inline_sent_bytes: u64,
    /// Messages received inline.
    pub inline_received: u64,
    /// Their bytes.
    pub inline_received_bytes: u64,
    /// References from a peer that were refused (unknown session or segment, bad range, malformed).
    pub bad_references: u64,
    /// Releases from a peer that were refused (stale, repeated, unknown).
    pub bad_releases: u64,
    /// Frames, registrations and references from peers that were refused (each is logged at `debug` only, so a
    /// hostile peer cannot flood the logs).
    pub peer_refusals: u64,
    /// Messages above the threshold that went inline, by reason.
    pub fallbacks: Vec<(Fallback, u64)>,
}

impl TransferStats {
    /// The count for one fallback reason.
    pub fn fallback(&self, reason: Fallback) -> u64 {
        self.fallbacks.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
    }
}

/// Reads the counters.
pub fn snapshot() -> TransferStats {
    let c = &COUNTERS;
    TransferStats {
        shm_sent: c.shm_sent.load(Relaxed),
        shm_sent_bytes: c.shm_sent_bytes.load(Relaxed),
        shm_received: c.shm_received.load(Relaxed),
        shm_received_bytes: c.shm_received_bytes.load(Relaxed),
        inline_sent: c.inline_sent.load(Relaxed),
        inline_sent_bytes: c.inline_sent_bytes.load(Relaxed),
        inline_received: c.inline_received.load(Relaxed),
        inline_received_bytes: c.inline_received_bytes.load(Relaxed),
        bad_references: c.bad_references.load(Relaxed),
        bad_releases: c.bad_releases.load(Relaxed),
        peer_refusals: c.peer_refusals.load(Relaxed),
        fallbacks: Fallback::ALL.iter().map(|&f| (f, c.fallbacks[f.index()].load(Relaxed))).collect(),
    }
}

pub(crate) fn shm_sent(bytes: usize) {
    COUNTERS.shm_sent.fetch_add(1, Relaxed);
    COUNTERS.shm_sent_bytes.fetch_add(bytes as u64, Relaxed);
}
pub(crate) fn shm_received(bytes: usize) {
    COUNTERS.shm_received.fetch_add(1, Relaxed);
    COUNTERS.shm_received_bytes.fetch_add(bytes as u64, Relaxed);
}
pub(crate) fn inline_sent(bytes: usize) {
    COUNTERS.inline_sent.fetch_add(1, Relaxed);
    COUNTERS.inline_sent_bytes.fetch_add(bytes as u64, Relaxed);
}
pub(crate) fn inline_received(bytes: usize) {
    COUNTERS.inline_received.fetch_add(1, Relaxed);
    COUNTERS.inline_received_bytes.fetch_add(bytes as u64, Relaxed);
}
pub(crate) fn bad_reference() {
    COUNTERS.bad_references.fetch_add(1, Relaxed);
}
pub(crate) fn bad_release() {
    COUNTERS.bad_releases.fetch_add(1, Relaxed);
}
pub(crate) fn fallback(reason: Fallback) {
    COUNTERS.fallbacks[reason.index()].fetch_add(1, Relaxed);
}
pub(crate) fn peer_refusal() {
    COUNTERS.peer_refusals.fetch_add(1, Relaxed);
}
