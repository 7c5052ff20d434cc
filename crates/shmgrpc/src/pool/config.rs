//! Pool configuration: size classes, byte budget, what an exhausted pool does, segment options and slabs.

use std::time::Duration;

use crate::segment::{Backend, SegmentOptions};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const GIB: usize = 1024 * MIB;

/// Default of [`PoolConfig::idle_release`].
pub const DEFAULT_IDLE_RELEASE: Duration = Duration::from_secs(30);

/// What [`Pool::alloc`](super::Pool::alloc) does when the budget is used up and nothing idle can be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExhausted {
    /// Wait until a buffer comes back (a lease is dropped). The default.
    #[default]
    Wait,
    /// Fail at once with [`Error::Exhausted`](crate::Error::Exhausted).
    Fail,
}

/// Configuration of a [`Pool`](super::Pool).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub(super) classes: Vec<usize>,
    pub(super) budget: u64,
    pub(super) on_exhausted: OnExhausted,
    pub(super) segment: SegmentOptions,
    pub(super) slab_max_class: usize,
    pub(super) slab_size: usize,
    pub(super) idle_release: Option<Duration>,
}

/// The budget of a default pool without a memory limit.
pub const DEFAULT_BUDGET: u64 = 4 * GIB as u64;

/// The default budget: [`DEFAULT_BUDGET`], or half the memory limit of the process's cgroup if that is less
/// ([`crate::cgroup::memory_limit`]). Pool pages are charged to the cgroup that first touches them (ours, for
/// the buffers we write), so a pool that could outgrow the limit would get the container OOM-killed; the other half
/// is left to the process's own memory (decoded messages, copies, the runtime).
pub fn default_budget() -> u64 {
    default_budget_under(crate::cgroup::memory_limit())
}

fn default_budget_under(limit: Option<u64>) -> u64 {
    limit.map_or(DEFAULT_BUDGET, |l| DEFAULT_BUDGET.min(l / 2))
}

impl Default for PoolConfig {
    /// Classes 64 KiB, 128 KiB, ... 1 GiB; a 4 GiB budget, or half the cgroup's memory limit if that is less
    /// ([`default_budget`]); wait when exhausted; prefaulted memfd segments; classes up to 4 MiB carved out of
    /// 64 MiB slabs; idle buffers dropped after 30 s.
    fn default() -> Self {
        PoolConfig {
            classes: (0..=14).map(|k| (64 * KIB) << k).collect(),
            budget: default_budget(),
            on_exhausted: OnExhausted::Wait,
            segment: SegmentOptions::new(Backend::Memfd).prefault(true),
            slab_max_class: 4 * MIB,
            slab_size: 64 * MIB,
            idle_release: Some(DEFAULT_IDLE_RELEASE),
        }
    }
}

impl PoolConfig {
    /// Sets the size classes (bytes). They are rounded up to whole pages, sorted and deduplicated.
    pub fn classes(mut self, sizes: impl IntoIterator<Item = usize>) -> Self {
        self.classes = sizes.into_iter().collect();
        self
    }
    /// Sets the most bytes the pool may hold in segments, idle or leased.
    pub fn budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }
    /// Sets what `alloc` does when the budget is used up.
    pub fn on_exhausted(mut self, policy: OnExhausted) -> Self {
        self.on_exhausted = policy;
        self
    }
    /// Sets the backend of new segments.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.segment = self.segment.with_backend(backend);
        self
    }
    /// Sets the full segment options (backend, prefaulting, huge pages, System V key).
    pub fn segment_options(mut self, opts: SegmentOptions) -> Self {
        self.segment = opts;
        self
    }
    /// Prefault new buffers (default on).
    pub fn prefault(mut self, yes: bool) -> Self {
        self.segment = self.segment.prefault(yes);
        self
    }
    /// Ask for transparent huge pages on new buffers (default off).
    pub fn huge_pages(mut self, yes: bool) -> Self {
        self.segment = self.segment.huge_pages(yes);
        self
    }
    /// Carves the buffers of classes up to `max_class` bytes out of slab segments of `slab_size` bytes (default
    /// 4 MiB and 64 MiB; memfd backend only). A class gets slabs only if at least two of its buffers fit in one.
    /// `max_class` 0 gives every buffer a segment of its own.
    pub fn slabs(mut self, max_class: usize, slab_size: usize) -> Self {
        self.slab_max_class = max_class;
        self.slab_size = slab_size;
        self
    }
    /// How long a buffer may stay idle before [`Pool::trim_idle`](super::Pool::trim_idle) drops it, giving its memory
    /// back to the system (default 30 s; `None`: never). Buffers made by `preallocate` stay whatever this is.
    pub fn idle_release(mut self, period: Option<Duration>) -> Self {
        self.idle_release = period;
        self
    }
    /// The configured idle period (see [`PoolConfig::idle_release`]).
    pub fn idle_release_period(&self) -> Option<Duration> {
        self.idle_release
    }
    /// The configured budget in bytes.
    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    /// Slots per slab for a class of `size` bytes, if the class uses slabs.
    pub(super) fn slots_for(&self, size: usize) -> Option<usize> {
        let slots = self.slab_size / size.max(1);
        (self.segment.backend() == Backend::Memfd && size <= self.slab_max_class && slots >= 2).then_some(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_stays_at_half_a_memory_limit() {
        assert_eq!(default_budget_under(None), DEFAULT_BUDGET);
        assert_eq!(default_budget_under(Some(512 << 20)), 256 << 20);
        assert_eq!(default_budget_under(Some(64 << 30)), DEFAULT_BUDGET);
    }
}
