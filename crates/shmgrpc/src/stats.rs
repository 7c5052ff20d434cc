//! Process-wide transfer counters: what went through shared memory, what went inline and why.
//!
//! The codec has no connection context (tonic creates it with `Default::default()`), so the counters are global
//! to the process; read them with [`snapshot`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::protocol::Side;

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
    /// The peer already holds a large share of our pool (a sixteenth of its budget or more) and the pool is nearly
    /// full: the last quarter of the budget is left to peers that hold little.
    ShareExceeded,
}

impl Fallback {
    /// All reasons, in counter order.
    pub const ALL: [Fallback; 10] = [
        Fallback::PeerLacksShmgrpc,
        Fallback::DiscoveryFailed,
        Fallback::UnsupportedVersion,
        Fallback::SideChannelUnreachable,
        Fallback::HandshakeFailed,
        Fallback::SessionClosed,
        Fallback::PoolExhausted,
        Fallback::RegistrationFailed,
        Fallback::WindowFull,
        Fallback::ShareExceeded,
    ];

    fn index(self) -> usize {
        Fallback::ALL.iter().position(|&f| f == self).expect("listed")
    }

    /// A short snake-case name (the `reason` label of the exported fallback metric).
    pub fn label(self) -> &'static str {
        match self {
            Fallback::PeerLacksShmgrpc => "peer_lacks_shmgrpc",
            Fallback::DiscoveryFailed => "discovery_failed",
            Fallback::UnsupportedVersion => "unsupported_version",
            Fallback::SideChannelUnreachable => "side_channel_unreachable",
            Fallback::HandshakeFailed => "handshake_failed",
            Fallback::SessionClosed => "session_closed",
            Fallback::PoolExhausted => "pool_exhausted",
            Fallback::RegistrationFailed => "registration_failed",
            Fallback::WindowFull => "window_full",
            Fallback::ShareExceeded => "share_exceeded",
        }
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
            Fallback::ShareExceeded => "peer holds its share of the pool",
        })
    }
}

/// One message, refusal or fallback, as counted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Event {
    /// A message sent as a reference, and its payload bytes.
    ShmSent(usize),
    /// A message received as a reference, and its payload bytes.
    ShmReceived(usize),
    /// A message sent inline, and its bytes.
    InlineSent(usize),
    /// A message received inline, and its bytes.
    InlineReceived(usize),
    /// A reference from the peer that was refused.
    BadReference,
    /// A release from the peer that was refused.
    BadRelease,
    /// A frame, registration or reference from the peer that was refused.
    PeerRefusal,
    /// A message above the threshold that went inline, and why.
    Fallback(Fallback),
    /// A call began waiting (asynchronously, before its first message) for the peer to release window space.
    WindowWait,
    /// A call began waiting (asynchronously, before its first message) for a buffer to come back to the pool.
    PoolWait,
    /// A message of ours the peer never received (its stream ended first, `CallEnd`): its holds were dropped.
    LostInFlight,
}

#[derive(Debug)]
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
    window_waits: AtomicU64,
    pool_waits: AtomicU64,
    lost_in_flight: AtomicU64,
    fallbacks: [AtomicU64; Fallback::ALL.len()],
}

impl Counters {
    const fn new() -> Self {
        Counters {
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
            window_waits: AtomicU64::new(0),
            pool_waits: AtomicU64::new(0),
            lost_in_flight: AtomicU64::new(0),
            fallbacks: [const { AtomicU64::new(0) }; Fallback::ALL.len()],
        }
    }

    fn add(&self, event: Event) {
        let message = |n: &AtomicU64, b: &AtomicU64, bytes: usize| {
            n.fetch_add(1, Relaxed);
            b.fetch_add(bytes as u64, Relaxed);
        };
        match event {
            Event::ShmSent(bytes) => message(&self.shm_sent, &self.shm_sent_bytes, bytes),
            Event::ShmReceived(bytes) => message(&self.shm_received, &self.shm_received_bytes, bytes),
            Event::InlineSent(bytes) => message(&self.inline_sent, &self.inline_sent_bytes, bytes),
            Event::InlineReceived(bytes) => message(&self.inline_received, &self.inline_received_bytes, bytes),
            Event::BadReference => _ = self.bad_references.fetch_add(1, Relaxed),
            Event::BadRelease => _ = self.bad_releases.fetch_add(1, Relaxed),
            Event::PeerRefusal => _ = self.peer_refusals.fetch_add(1, Relaxed),
            Event::Fallback(reason) => _ = self.fallbacks[reason.index()].fetch_add(1, Relaxed),
            Event::WindowWait => _ = self.window_waits.fetch_add(1, Relaxed),
            Event::PoolWait => _ = self.pool_waits.fetch_add(1, Relaxed),
            Event::LostInFlight => _ = self.lost_in_flight.fetch_add(1, Relaxed),
        }
    }

    fn snapshot(&self) -> TransferStats {
        TransferStats {
            shm_sent: self.shm_sent.load(Relaxed),
            shm_sent_bytes: self.shm_sent_bytes.load(Relaxed),
            shm_received: self.shm_received.load(Relaxed),
            shm_received_bytes: self.shm_received_bytes.load(Relaxed),
            inline_sent: self.inline_sent.load(Relaxed),
            inline_sent_bytes: self.inline_sent_bytes.load(Relaxed),
            inline_received: self.inline_received.load(Relaxed),
            inline_received_bytes: self.inline_received_bytes.load(Relaxed),
            bad_references: self.bad_references.load(Relaxed),
            bad_releases: self.bad_releases.load(Relaxed),
            peer_refusals: self.peer_refusals.load(Relaxed),
            window_waits: self.window_waits.load(Relaxed),
            pool_waits: self.pool_waits.load(Relaxed),
            lost_in_flight: self.lost_in_flight.load(Relaxed),
            fallbacks: Fallback::ALL.iter().map(|&f| (f, self.fallbacks[f.index()].load(Relaxed))).collect(),
        }
    }
}

static GLOBAL: Counters = Counters::new();

/// A snapshot of transfer counters: the process's ([`snapshot`]), one channel's ([`crate::ShmChannel::stats`]) or
/// one server's ([`crate::ShmServer::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Messages sent as a reference to shared memory.
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
    /// Their bytes (as framed on the gRPC stream: compressed size for compressed messages).
    pub inline_received_bytes: u64,
    /// References from a peer that were refused (unknown session or segment, bad range, malformed).
    pub bad_references: u64,
    /// Releases and `Returned` answers from a peer that were refused (stale, repeated, unknown).
    pub bad_releases: u64,
    /// Frames, registrations and references from peers that were refused (each is logged at `debug` only, so a
    /// hostile peer cannot flood the logs).
    pub peer_refusals: u64,
    /// Calls that waited (asynchronously, before their first message, bounded by the window wait) because the
    /// peer held a full in-flight window of our buffers.
    pub window_waits: u64,
    /// Calls that waited (asynchronously, before their first message, bounded by the exhausted wait) for a buffer
    /// to come back to an exhausted pool.
    pub pool_waits: u64,
    /// Messages of ours with something in shared memory that the peer never received, because its end of the
    /// stream stopped reading first (a cancelled stream, a call rejected before its handler read it; protocol
    /// version 3 `CallEnd`): their holds were dropped when the peer said so, instead of at the session's end.
    pub lost_in_flight: u64,
    /// Messages at or above the threshold that went inline, by reason.
    pub fallbacks: Vec<(Fallback, u64)>,
}

impl TransferStats {
    /// The count for one fallback reason.
    pub fn fallback(&self, reason: Fallback) -> u64 {
        self.fallbacks.iter().find(|(r, _)| *r == reason).map_or(0, |(_, n)| *n)
    }

    /// Messages at or above the threshold that went inline, whatever the reason.
    pub fn fallbacks_total(&self) -> u64 {
        self.fallbacks.iter().map(|(_, n)| n).sum()
    }
}

/// Reads the process-wide counters: every message any [`crate::ShmCodec`] of this process encoded or decoded, with
/// or without a [`crate::ShmChannel`] or [`crate::ShmServer`] around it. Other code of the process (other tests, other
/// channels) moves them too: to see what one channel or server did, use its own `stats()`.
pub fn snapshot() -> TransferStats {
    GLOBAL.snapshot()
}

/// Counts `event` in the process-wide counters only (the codec's view, which has no channel or server).
pub(crate) fn global(event: Event) {
    GLOBAL.add(event);
}

/// The counters of one channel or one server (shared by its sessions and calls), exported through the `metrics`
/// facade when that feature is on.
#[derive(Debug)]
pub(crate) struct Recorder {
    /// The `side` label of exported metrics (read only with the `metrics` feature).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    side: Side,
    counters: Counters,
}

impl Recorder {
    pub(crate) fn new(side: Side) -> std::sync::Arc<Recorder> {
        std::sync::Arc::new(Recorder { side, counters: Counters::new() })
    }

    /// Counts `event` for this channel or server (not in the process-wide counters: see [`global`]).
    pub(crate) fn record(&self, event: Event) {
        self.counters.add(event);
        #[cfg(feature = "metrics")]
        export::event(self.side, event);
    }

    /// Counts `event` here and in the process-wide counters.
    pub(crate) fn record_both(&self, event: Event) {
        global(event);
        self.record(event);
    }

    pub(crate) fn snapshot(&self) -> TransferStats {
        self.counters.snapshot()
    }

    /// A session of this channel or server opened (`+1`) or ended (`-1`).
    pub(crate) fn session(&self, delta: i8) {
        #[cfg(feature = "metrics")]
        export::sessions(self.side, delta);
        let _ = delta;
    }

    /// The peer released a hold it had for `held`.
    pub(crate) fn release_latency(&self, held: std::time::Duration) {
        #[cfg(feature = "metrics")]
        export::release(self.side, held);
        let _ = held;
    }

    /// The peer acknowledged a registration `took` after we queued it.
    pub(crate) fn registration_latency(&self, took: std::time::Duration) {
        #[cfg(feature = "metrics")]
        export::registration(self.side, took);
        let _ = took;
    }
}

/// Names of the metrics shmgrpc exports through the [`metrics`](https://docs.rs/metrics) facade (feature
/// `metrics`). Every metric carries a `side` label (`client` for a [`crate::ShmChannel`], `server` for a
/// [`crate::ShmServer`]); message metrics also `direction` (`sent`, `received`) and `path` (`shm`, `inline`).
pub mod metric_names {
    /// Counter: messages, by `side`, `direction` and `path`.
    pub const MESSAGES: &str = "shmgrpc_messages_total";
    /// Counter: their payload bytes, by `side`, `direction` and `path`.
    pub const MESSAGE_BYTES: &str = "shmgrpc_message_bytes_total";
    /// Counter: messages at or above the threshold that went inline, by `side` and `reason`
    /// ([`crate::Fallback::label`]).
    pub const FALLBACKS: &str = "shmgrpc_fallbacks_total";
    /// Counter: frames, registrations, references and releases from peers that were refused, by `side`.
    pub const PEER_REFUSALS: &str = "shmgrpc_peer_refusals_total";
    /// Counter: references from peers that were refused (also counted in [`PEER_REFUSALS`]), by `side`.
    pub const BAD_REFERENCES: &str = "shmgrpc_bad_references_total";
    /// Counter: releases from peers that were refused (also counted in [`PEER_REFUSALS`]), by `side`.
    pub const BAD_RELEASES: &str = "shmgrpc_bad_releases_total";
    /// Counter: calls that waited before their first message, by `side` and `reason` (`window`, `pool`).
    pub const WAITS: &str = "shmgrpc_waits_total";
    /// Counter {side}: messages the peer never received because its end of the call stopped reading first.
    pub const LOST_IN_FLIGHT: &str = "shmgrpc_lost_in_flight_total";
    /// Gauge: open sessions, by `side`.
    pub const SESSIONS: &str = "shmgrpc_sessions";
    /// Gauge: bytes of pool buffers, by `state` (`in_use`, `idle`), summed over the process's pools.
    /// (Moved by the pool itself, which is built without the gRPC layer: [`crate::pool::POOL_BYTES_METRIC`].)
    pub const POOL_BYTES: &str = crate::pool::POOL_BYTES_METRIC;
    /// Histogram: seconds from queueing a segment's `Register` to the peer's `Registered`, by `side`.
    pub const REGISTRATION_SECONDS: &str = "shmgrpc_registration_seconds";
    /// Histogram: seconds a peer held one of our buffers (reference sent to release received), by `side`.
    pub const RELEASE_SECONDS: &str = "shmgrpc_release_seconds";
}

#[cfg(feature = "metrics")]
mod export {
    use super::{Event, metric_names as m};
    use crate::protocol::Side;

    pub(super) fn event(side: Side, event: Event) {
        let side = side.label();
        let message = |direction: &'static str, path: &'static str, bytes: usize| {
            let labels = [("side", side), ("direction", direction), ("path", path)];
            metrics::counter!(m::MESSAGES, &labels).increment(1);
            metrics::counter!(m::MESSAGE_BYTES, &labels).increment(bytes as u64);
        };
        match event {
            Event::ShmSent(b) => message("sent", "shm", b),
            Event::ShmReceived(b) => message("received", "shm", b),
            Event::InlineSent(b) => message("sent", "inline", b),
            Event::InlineReceived(b) => message("received", "inline", b),
            Event::BadReference => metrics::counter!(m::BAD_REFERENCES, "side" => side).increment(1),
            Event::BadRelease => metrics::counter!(m::BAD_RELEASES, "side" => side).increment(1),
            Event::PeerRefusal => metrics::counter!(m::PEER_REFUSALS, "side" => side).increment(1),
            Event::Fallback(reason) => {
                metrics::counter!(m::FALLBACKS, "side" => side, "reason" => reason.label()).increment(1)
            }
            Event::WindowWait => metrics::counter!(m::WAITS, "side" => side, "reason" => "window").increment(1),
            Event::PoolWait => metrics::counter!(m::WAITS, "side" => side, "reason" => "pool").increment(1),
            Event::LostInFlight => metrics::counter!(m::LOST_IN_FLIGHT, "side" => side).increment(1),
        }
    }

    pub(super) fn sessions(side: Side, delta: i8) {
        metrics::gauge!(m::SESSIONS, "side" => side.label()).increment(f64::from(delta));
    }

    pub(super) fn release(side: Side, held: std::time::Duration) {
        metrics::histogram!(m::RELEASE_SECONDS, "side" => side.label()).record(held.as_secs_f64());
    }

    pub(super) fn registration(side: Side, took: std::time::Duration) {
        metrics::histogram!(m::REGISTRATION_SECONDS, "side" => side.label()).record(took.as_secs_f64());
    }
}
