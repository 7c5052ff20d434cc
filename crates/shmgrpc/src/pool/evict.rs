//! Dropping idle buffers, giving their memory back to the system: to make room for another size class
//! ([`Pool::alloc`] over budget), on request ([`Pool::trim`]), and after the idle period ([`Pool::trim_idle`]).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::lease::Buffer;
use super::stats::gauges;
use super::{Class, ClassState, Pool};
use crate::sync::lock;

impl Pool {
    /// Drops idle buffers, largest classes first, until `needed` bytes would fit in the budget (or none is left).
    /// In a class carved out of slabs, only a whole slab whose every carved slot is idle can go.
    pub(super) fn evict(&self, needed: u64) {
        let budget = self.inner.config.budget;
        for class in self.inner.classes.iter().rev() {
            while self.inner.reserved.load(Ordering::Acquire) + needed > budget {
                let Some((id, victims)) = take_idle(class, |_| true) else { break };
                self.discard(id, victims);
            }
        }
    }

    /// Drops `victims`, the idle buffers of segment `id`, taken out of their class: unmapped and removed before
    /// their budget is handed on. Returns their bytes.
    fn discard(&self, id: u32, victims: Vec<Buffer>) -> u64 {
        let n = victims.len() as u64;
        let bytes: u64 = victims.iter().map(|b| b.capacity() as u64).sum();
        lock(&self.inner.ranges).remove(&id);
        drop(victims);
        self.inner.reserved.fetch_sub(bytes, Ordering::AcqRel);
        self.inner.counters.evictions.fetch_add(n, Ordering::Relaxed);
        bytes
    }

    /// Drops the idle buffers of class `class` whose segments belong to `tenant` (a retired one): its own
    /// segments, and its slabs once every slot of them is idle.
    pub(super) fn drop_tenant_buffers(&self, class: usize, tenant: u64) {
        while let Some((id, victims)) = take_idle(&self.inner.classes[class], |b| b.tenant() == tenant) {
            self.discard(id, victims);
        }
    }

    /// Drops every idle buffer, returning their memory to the system.
    pub fn trim(&self) {
        self.evict(u64::MAX / 2);
    }

    /// Drops the idle buffers that have been idle for the configured idle period
    /// ([`PoolConfig::idle_release`](super::PoolConfig::idle_release)), except those [`Pool::preallocate`] made (the pool's floor), returning their
    /// memory to the system; returns their bytes. A slab goes only when every slot carved out of it is such a
    /// buffer. Counted in [`PoolStats::trimmed_bytes`](super::PoolStats::trimmed_bytes) and as evictions.
    ///
    /// The pool has no thread or timer of its own: something must call this now and then. The gRPC layer does,
    /// for the pools of its channels and servers, from its I/O thread.
    pub fn trim_idle(&self) -> u64 {
        let Some(period) = self.inner.config.idle_release else { return 0 };
        let now = Instant::now();
        let stale = |b: &Buffer| !b.preallocated && now.saturating_duration_since(b.idle_since) >= period;
        let mut bytes = 0;
        for class in self.inner.classes.iter() {
            while let Some((id, victims)) = take_idle(class, stale) {
                bytes += self.discard(id, victims);
            }
        }
        if bytes > 0 {
            self.inner.counters.trimmed_bytes.fetch_add(bytes, Ordering::Relaxed);
            tracing::debug!(bytes, "pool gave idle memory back");
        }
        bytes
    }
}

/// Takes out of `class` the idle buffers of one segment that may go, if there is such a segment: a free buffer of
/// its own for which `may_go` holds, or a whole slab whose every carved slot is idle and may go.
fn take_idle(class: &Class, may_go: impl Fn(&Buffer) -> bool) -> Option<(u32, Vec<Buffer>)> {
    let mut st = lock(&class.state);
    let (id, victims) = if class.slots.is_some() {
        let idle = |st: &ClassState, id: u32| {
            let of = st.free.iter().filter(|b| b.id == id);
            of.clone().all(&may_go).then(|| of.count())
        };
        let i = st.slabs.iter().position(|s| idle(&st, s.slab.id()) == Some(s.carved))?;
        let id = st.slabs.swap_remove(i).slab.id();
        let (victims, kept) = std::mem::take(&mut st.free).into_iter().partition(|b| b.id == id);
        st.free = kept;
        (id, victims)
    } else {
        let i = st.free.iter().rposition(&may_go)?;
        let b = st.free.swap_remove(i);
        (b.id, vec![b])
    };
    let bytes: u64 = victims.iter().map(|b: &Buffer| b.capacity() as u64).sum();
    st.total -= victims.len();
    st.bytes -= bytes;
    gauges(0, -(bytes as i64));
    Some((id, victims))
}
