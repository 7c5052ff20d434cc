//! Pool figures: [`PoolStats`] (the seed's `MemPoolInfo`) and its table, and the exported pool-bytes gauges.

use std::fmt;

/// Name of the gauge the pool moves through the `metrics` facade (feature `metrics`): bytes of pool buffers by
/// `state` (`in_use`, `idle`), summed over the process's pools.
pub const POOL_BYTES_METRIC: &str = "shmgrpc_pool_bytes";

/// Moves the exported pool-bytes gauges by these many bytes (feature `metrics`; a no-op without it).
#[inline]
pub(super) fn gauges(in_use: i64, idle: i64) {
    #[cfg(feature = "metrics")]
    {
        if in_use != 0 {
            metrics::gauge!(POOL_BYTES_METRIC, "state" => "in_use").increment(in_use as f64);
        }
        if idle != 0 {
            metrics::gauge!(POOL_BYTES_METRIC, "state" => "idle").increment(idle as f64);
        }
    }
    let _ = (in_use, idle);
}

/// Figures of one size class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassStats {
    /// Buffer size of the class; `None` for the oversize class (requests above the largest class).
    pub size: Option<usize>,
    /// Buffers that exist.
    pub total: usize,
    /// Idle buffers.
    pub free: usize,
    /// Leased buffers.
    pub in_use: usize,
    /// Bytes of all buffers.
    pub bytes: u64,
    /// Bytes of leased buffers.
    pub in_use_bytes: u64,
}

/// A snapshot of a pool, from [`Pool::stats`](super::Pool::stats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// The configured budget.
    pub budget: u64,
    /// Bytes of all buffers (idle and in use).
    pub bytes: u64,
    /// Bytes of leased buffers.
    pub in_use_bytes: u64,
    /// Allocation requests.
    pub allocs: u64,
    /// Buffers created on demand.
    pub grows: u64,
    /// Times an allocation waited for a buffer to come back.
    pub waits: u64,
    /// Times an allocation or preallocation failed for lack of budget.
    pub exhausted: u64,
    /// Idle buffers dropped: to make room for another class, by [`Pool::trim`](super::Pool::trim), or for being idle
    /// longer than the idle period.
    pub evictions: u64,
    /// Bytes of buffers dropped for being idle longer than the idle period ([`Pool::trim_idle`](super::Pool::trim_idle)).
    pub trimmed_bytes: u64,
    /// Per class, smallest first; the last entry is the oversize class.
    pub classes: Vec<ClassStats>,
}

impl PoolStats {
    /// Whether no buffer is leased.
    pub fn is_idle(&self) -> bool {
        self.in_use_bytes == 0
    }
}

impl fmt::Display for PoolStats {
    /// A table in the spirit of the seed's `MemPoolInfo`: only classes that hold buffers, then the totals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:>12} {:>7} {:>7} {:>7} {:>14} {:>14}",
            "class", "total", "free", "in use", "bytes", "in use bytes"
        )?;
        for c in self.classes.iter().filter(|c| c.total > 0) {
            let size = c.size.map_or_else(|| "oversize".to_string(), |s| s.to_string());
            writeln!(
                f,
                "{size:>12} {:>7} {:>7} {:>7} {:>14} {:>14}",
                c.total, c.free, c.in_use, c.bytes, c.in_use_bytes
            )?;
        }
        write!(
            f,
            "total {} of {} budget bytes, {} in use; {} allocs, {} grows, {} waits, {} exhausted, {} evictions, {} \
             bytes trimmed",
            self.bytes,
            self.budget,
            self.in_use_bytes,
            self.allocs,
            self.grows,
            self.waits,
            self.exhausted,
            self.evictions,
            self.trimmed_bytes
        )
    }
}
