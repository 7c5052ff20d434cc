//! The pool: a size-class allocator of shared-memory buffers.
//!
//! This is the seed's `SharedMemoryAllocator` made safe and fast. Each buffer is one [`Segment`]; buffers are grouped
//! in size classes (64 KiB to 1 GiB by default, powers of two), each class a free list behind its own short lock.
//! [`Pool::alloc`] takes the smallest class that fits (best fit), reuses a free buffer or creates one (growth on
//! demand) as long as the total stays within the byte budget; over budget it first drops idle buffers of other
//! classes, then waits (async) or fails, as configured. A request above the largest class gets a buffer of its own
//! size (page-rounded), kept for reuse like the others. A buffer created for a request is prefaulted up to the
//! requested size (a preallocated one wholly), so writing it runs at `memcpy` speed.
//!
//! *Slabs.* Classes up to 4 MiB (by default, memfd backend) do not get a segment per buffer: their buffers are
//! slots carved out of 64 MiB slab segments, so many buffers share one descriptor, one registration with each peer
//! and one mapping on each side. A slot is charged to the budget when it is carved (a slab's untouched rest costs
//! no memory: memfd pages exist only once written), and slots leave only with their whole slab, which is dropped
//! when every slot of it is idle and room is needed.
//!
//! *Tenants.* A peer sent a segment can map all of it for as long as it likes, so a pool shared by several peers
//! keeps their buffers in separate segments: [`Pool::tenant`] makes a tenant, [`Pool::try_alloc_for`] gives it
//! buffers only from segments that held its own buffers or nobody's (which then become its own), and
//! [`Pool::retire`] drops its segments once idle. Allocations without a tenant take only segments no tenant had.
//! A preallocated buffer becomes the first tenant's that takes it and goes with it (the floor is not rebuilt).
//!
//! A [`Lease`] is exclusive use of one buffer; dropping it *returns* the buffer to the pool. The pool knows nothing
//! of peers or gRPC: what a peer holds is tracked by the gRPC layer's session, which keeps the lease until the peer's
//! generation-checked release arrives (see `docs/protocol.md`, *Holds and releases*).
//!
//! Files: `config.rs` ([`PoolConfig`]), `lease.rs` (buffers and [`Lease`]), `slab.rs` (slabs and their slots),
//! `evict.rs` (dropping idle buffers: for room, on request, after the idle period), `stats.rs` ([`PoolStats`] and
//! the exported gauges); this file is the allocator.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

mod config;
mod evict;
mod lease;
mod slab;
mod stats;

pub use config::{DEFAULT_BUDGET, DEFAULT_IDLE_RELEASE, OnExhausted, PoolConfig, default_budget};
pub use lease::Lease;
pub use stats::{ClassStats, POOL_BYTES_METRIC, PoolStats};

use crate::error::{Error, Result};
use crate::segment::{Backend, Segment, page_size};
use crate::sync::lock;
use lease::{Buffer, Storage};
use slab::{Slab, Slot};
use stats::gauges;

/// A slab of a class and how far it has been carved (slot indices `carved..` are untouched).
struct SlabState {
    slab: Arc<Slab>,
    carved: usize,
}

/// One size class. `size == None` is the oversize class, whose buffers each have their own size.
struct Class {
    size: Option<usize>,
    /// Slots per slab, for a class carved out of slabs.
    slots: Option<usize>,
    state: Mutex<ClassState>,
}

#[derive(Default)]
struct ClassState {
    free: Vec<Buffer>,
    slabs: Vec<SlabState>,
    /// Buffers of this class that exist (free or leased).
    total: usize,
    /// Their bytes.
    bytes: u64,
    /// Bytes of the buffers currently leased.
    in_use_bytes: u64,
}

#[derive(Default)]
struct Counters {
    allocs: AtomicU64,
    grows: AtomicU64,
    waits: AtomicU64,
    exhausted: AtomicU64,
    evictions: AtomicU64,
    trimmed_bytes: AtomicU64,
}

struct Inner {
    config: PoolConfig,
    /// Address ranges of every buffer that exists, by id (for [`Pool::contains`]).
    ranges: Mutex<HashMap<u32, (usize, usize)>>,
    classes: Box<[Class]>,
    /// Bytes of every segment that exists or is being created; never above the budget.
    reserved: AtomicU64,
    /// Bytes of the buffers leased now (the sum of the classes' `in_use_bytes`, kept at hand for
    /// [`Pool::try_alloc_leaving`]).
    in_use: AtomicU64,
    next_id: AtomicU32,
    returns: Arc<Notify>,
    /// Release count and condition variable for blocking waits ([`Pool::alloc_blocking`]).
    returns_sync: (Mutex<u64>, Condvar),
    counters: Counters,
    /// Tenants given out and not retired (see [`Pool::tenant`]), and the next tenant's number.
    tenants: Mutex<HashSet<u64>>,
    next_tenant: AtomicU64,
}

impl Drop for Inner {
    /// The last lease and the last clone of the pool are gone: every buffer left is idle and goes now.
    fn drop(&mut self) {
        let idle: u64 = self.classes.iter().map(|c| lock(&c.state).bytes).sum();
        gauges(0, -(idle as i64));
    }
}

/// A pool of shared-memory buffers. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

/// A user of a pool whose buffers are shared with one peer ([`Pool::tenant`]): a segment that held one tenant's
/// buffers never holds another's.
///
/// A peer that was sent a segment's descriptor (or name) can map all of it and keep it mapped, and read every buffer
/// in it, long after the buffer it was told of went back to the pool. So a pool shared by several peers (a server's,
/// shared by its sessions) must not put one peer's message into memory another peer was given. The gRPC layer makes
/// one tenant per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tenant(u64);

/// A pool that may be gone: see [`Pool::downgrade`].
#[derive(Debug, Clone)]
pub struct WeakPool {
    inner: std::sync::Weak<Inner>,
}

impl WeakPool {
    /// The pool, if a clone of it (or a lease) still exists.
    pub fn upgrade(&self) -> Option<Pool> {
        self.inner.upgrade().map(|inner| Pool { inner })
    }

    /// Whether this is a handle on `pool`.
    pub fn points_to(&self, pool: &Pool) -> bool {
        std::ptr::eq(self.inner.as_ptr(), Arc::as_ptr(&pool.inner))
    }
}

/// Why one allocation attempt did not produce a lease.
enum Miss {
    Budget { needed: u64 },
    Fatal(Error),
}

impl Pool {
    /// Creates an empty pool (no segment exists until [`Pool::preallocate`] or [`Pool::alloc`]).
    pub fn new(mut config: PoolConfig) -> Result<Pool> {
        let page = page_size();
        if config.classes.is_empty() {
            return Err(Error::InvalidArgument("a pool needs at least one size class".into()));
        }
        if config.budget == 0 {
            return Err(Error::InvalidArgument("a pool budget of 0 bytes allows nothing".into()));
        }
        for c in &mut config.classes {
            if *c == 0 {
                return Err(Error::InvalidArgument("size classes must be above 0 bytes".into()));
            }
            *c = c
                .checked_next_multiple_of(page)
                .ok_or_else(|| Error::InvalidArgument("size class too large".into()))?;
        }
        config.classes.sort_unstable();
        config.classes.dedup();
        let classes = config
            .classes
            .iter()
            .map(|&s| Class { size: Some(s), slots: config.slots_for(s), state: Mutex::default() })
            .chain(std::iter::once(Class { size: None, slots: None, state: Mutex::default() }))
            .collect();
        Ok(Pool {
            inner: Arc::new(Inner {
                config,
                ranges: Mutex::default(),
                classes,
                reserved: AtomicU64::new(0),
                in_use: AtomicU64::new(0),
                next_id: AtomicU32::new(1),
                returns: Arc::new(Notify::new()),
                returns_sync: (Mutex::new(0), Condvar::new()),
                counters: Counters::default(),
                tenants: Mutex::default(),
                next_tenant: AtomicU64::new(1),
            }),
        })
    }

    /// The configuration in force (classes rounded to pages, sorted).
    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    /// Index of the best-fit class for `size` and the capacity a new buffer of it gets.
    fn class_for(&self, size: usize) -> Result<(usize, usize)> {
        let classes = &self.inner.config.classes;
        match classes.iter().position(|&c| c >= size) {
            Some(i) => Ok((i, classes[i])),
            None => {
                let cap = size
                    .max(1)
                    .checked_next_multiple_of(page_size())
                    .ok_or_else(|| Error::InvalidArgument(format!("allocation of {size} bytes is too large")))?;
                Ok((classes.len(), cap))
            }
        }
    }

    /// Creates `count` idle buffers of the class that fits `size`, so the first calls find them ready.
    pub fn preallocate(&self, size: usize, count: usize) -> Result<()> {
        let (ci, cap) = self.class_for(size)?;
        for _ in 0..count {
            if !self.reserve(cap as u64) {
                return Err(self.exhausted(cap as u64));
            }
            let mut buffer = self.create(ci, cap, cap, 0)?;
            buffer.preallocated = true;
            let mut st = lock(&self.inner.classes[ci].state);
            st.total += 1;
            st.bytes += cap as u64;
            st.free.push(buffer);
            gauges(0, cap as i64);
        }
        Ok(())
    }

    /// Allocates a buffer of at least `size` bytes; the lease's length is `size`.
    ///
    /// Over budget it drops idle buffers of other classes; if that is not enough it waits for a return or fails,
    /// per [`PoolConfig::on_exhausted`]. A request larger than the whole budget fails at once.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a size of 0 or above the budget; [`Error::Exhausted`] when the budget is used
    /// up and the pool is configured to fail ([`OnExhausted::Fail`]); [`Error::Os`] or [`Error::Randomness`] when a
    /// new segment cannot be created.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> shmgrpc::Result<()> {
    /// let pool = shmgrpc::Pool::new(shmgrpc::PoolConfig::default().budget(64 << 20))?;
    /// let mut lease = pool.alloc(3 << 20).await?; // a buffer of the 4 MiB class
    /// assert_eq!(lease.len(), 3 << 20);
    /// lease.fill(1);
    /// drop(lease); // back to the pool
    /// assert!(pool.stats().is_idle());
    /// # Ok(()) }
    /// ```
    pub async fn alloc(&self, size: usize) -> Result<Lease> {
        self.inner.counters.allocs.fetch_add(1, Ordering::Relaxed);
        loop {
            let returned = self.returns().notified();
            let mut returned = std::pin::pin!(returned);
            // Register before trying, so a return between the attempt and the await is not missed.
            returned.as_mut().enable();
            match self.attempt(size) {
                Ok(lease) => return Ok(lease),
                Err(Miss::Fatal(e)) => return Err(e),
                Err(Miss::Budget { needed }) => {
                    if self.inner.config.on_exhausted == OnExhausted::Fail {
                        return Err(self.exhausted(needed));
                    }
                    self.inner.counters.waits.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(size, "pool budget exhausted; waiting for a buffer to come back");
                    returned.await;
                }
            }
        }
    }

    /// Allocates, blocking the thread up to `timeout` for a return when the budget is used up (whatever the
    /// policy). For synchronous code off any async runtime; async code uses [`Pool::alloc`].
    pub fn alloc_blocking(&self, size: usize, timeout: std::time::Duration) -> Result<Lease> {
        self.inner.counters.allocs.fetch_add(1, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + timeout;
        let (count, cv) = &self.inner.returns_sync;
        loop {
            let seen = self.returned();
            match self.attempt(size) {
                Ok(lease) => return Ok(lease),
                Err(Miss::Fatal(e)) => return Err(e),
                Err(Miss::Budget { needed }) => {
                    let now = std::time::Instant::now();
                    if now >= deadline {
                        return Err(self.exhausted(needed));
                    }
                    self.inner.counters.waits.fetch_add(1, Ordering::Relaxed);
                    let guard = lock(count);
                    // A return between the attempt and here bumped the count: try again at once.
                    if *guard == seen {
                        let _ = cv.wait_timeout(guard, deadline - now).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
    }

    /// Allocates without ever waiting: over budget (after dropping idle buffers) it fails with
    /// [`Error::Exhausted`] whatever the policy.
    pub fn try_alloc(&self, size: usize) -> Result<Lease> {
        self.try_alloc_leaving(size, 0)
    }

    /// Like [`Pool::try_alloc`], but fails with [`Error::Exhausted`] unless at least `keep` bytes of the budget stay
    /// free of leases afterwards. For callers that share one pool among several users: a user that already holds
    /// much leaves the last `keep` bytes to the others. (Checked when the lease is made; concurrent allocations may
    /// overshoot it by a buffer each, never the budget.)
    pub fn try_alloc_leaving(&self, size: usize, keep: u64) -> Result<Lease> {
        self.try_alloc_for(Tenant(0), size, keep)
    }

    /// Like [`Pool::try_alloc_leaving`], for `tenant`: the buffer comes from a segment that only `tenant`'s buffers
    /// have used, or from one nobody's have, which then belongs to `tenant` until it is dropped (see
    /// [`Pool::tenant`]).
    pub fn try_alloc_for(&self, tenant: Tenant, size: usize, keep: u64) -> Result<Lease> {
        self.inner.counters.allocs.fetch_add(1, Ordering::Relaxed);
        match self.attempt_leaving(size, keep, tenant.0) {
            Ok(lease) => Ok(lease),
            Err(Miss::Fatal(e)) => Err(e),
            Err(Miss::Budget { needed }) => Err(self.exhausted(needed)),
        }
    }

    fn exhausted(&self, needed: u64) -> Error {
        self.inner.counters.exhausted.fetch_add(1, Ordering::Relaxed);
        let in_use = self.inner.classes.iter().map(|c| lock(&c.state).in_use_bytes).sum();
        Error::Exhausted { requested: needed, in_use, budget: self.inner.config.budget }
    }

    fn attempt(&self, size: usize) -> std::result::Result<Lease, Miss> {
        self.attempt_leaving(size, 0, 0)
    }

    fn attempt_leaving(&self, size: usize, keep: u64, tenant: u64) -> std::result::Result<Lease, Miss> {
        let (ci, cap) = self.class_for(size).map_err(Miss::Fatal)?;
        let budget = self.inner.config.budget;
        if cap as u64 > budget {
            return Err(Miss::Fatal(Error::InvalidArgument(format!(
                "allocation of {size} bytes exceeds the pool budget of {budget} bytes"
            ))));
        }
        if keep > 0 && self.inner.in_use.load(Ordering::Acquire) + cap as u64 + keep > budget {
            return Err(Miss::Budget { needed: cap as u64 + keep });
        }
        let class = &self.inner.classes[ci];
        // Reuse an idle buffer: the smallest that fits (only the oversize class has several sizes).
        {
            let mut st = lock(&class.state);
            let pick = if class.size.is_some() {
                // The most recently returned one this tenant may take (usually the last).
                st.free.iter().rposition(|b| b.fits_tenant(tenant))
            } else {
                // Oversize: best fit among idle buffers no more than twice the request.
                st.free
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.fits_tenant(tenant) && b.capacity() >= size && b.capacity() / 2 <= size)
                    .min_by_key(|(_, b)| b.capacity())
                    .map(|(i, _)| i)
            };
            if let Some(i) = pick {
                let mut buffer = st.free.swap_remove(i);
                let bound = buffer.bind(tenant);
                debug_assert!(bound, "picked a buffer of another tenant");
                st.in_use_bytes += buffer.capacity() as u64;
                self.inner.in_use.fetch_add(buffer.capacity() as u64, Ordering::AcqRel);
                drop(st);
                gauges(buffer.capacity() as i64, -(buffer.capacity() as i64));
                buffer.renew();
                return Ok(self.lease(buffer, ci, size));
            }
        }
        // Grow: reserve budget, dropping idle buffers if that makes room.
        if !self.reserve(cap as u64) {
            self.evict(cap as u64);
            if !self.reserve(cap as u64) {
                return Err(Miss::Budget { needed: cap as u64 });
            }
        }
        let mut buffer = self.create(ci, cap, size, tenant).map_err(Miss::Fatal)?;
        buffer.bind(tenant);
        {
            let mut st = lock(&class.state);
            st.total += 1;
            st.bytes += cap as u64;
            st.in_use_bytes += cap as u64;
        }
        self.inner.in_use.fetch_add(cap as u64, Ordering::AcqRel);
        gauges(cap as i64, 0);
        self.inner.counters.grows.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(class = cap, "pool grew by one buffer");
        Ok(self.lease(buffer, ci, size))
    }

    fn lease(&self, buffer: Buffer, class: usize, len: usize) -> Lease {
        Lease::new(buffer, class, len, self.clone())
    }

    /// Adds `bytes` to the reservation if the budget allows.
    fn reserve(&self, bytes: u64) -> bool {
        let budget = self.inner.config.budget;
        self.inner
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_add(bytes).filter(|&t| t <= budget))
            .is_ok()
    }

    /// Creates a new buffer of class `ci` (`cap` bytes: a slot of a slab, or a segment of its own), prefaulting
    /// (when configured) the first `touch` bytes: the ones the lease is about to write. Its budget is already
    /// reserved; on failure the reservation is given back.
    fn create(&self, ci: usize, cap: usize, touch: usize, tenant: u64) -> Result<Buffer> {
        let created = match self.inner.classes[ci].slots {
            Some(slots) => self.carve(ci, cap, slots, touch, tenant),
            None => self.create_own(cap, touch),
        };
        if created.is_err() {
            self.inner.reserved.fetch_sub(cap as u64, Ordering::AcqRel);
        }
        created
    }

    fn create_own(&self, cap: usize, touch: usize) -> Result<Buffer> {
        let prefault = self.inner.config.segment.prefaults();
        let opts = self.inner.config.segment.clone().prefault(false);
        let mut segment = Segment::create(cap, &opts)?;
        if prefault {
            segment.prefault(touch)?;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.ranges).insert(id, (segment.as_slice().as_ptr() as usize, segment.len()));
        Ok(Buffer::new(id, 0, Storage::Own(segment)))
    }

    /// Carves the next untouched slot of a slab of class `ci` that `tenant` may use (its own, or one nobody's
    /// buffers used yet, which becomes its own), creating a slab when none has one left.
    fn carve(&self, ci: usize, cap: usize, slots: usize, touch: usize, tenant: u64) -> Result<Buffer> {
        let class = &self.inner.classes[ci];
        let mut slot = loop {
            {
                let mut st = lock(&class.state);
                let usable = |s: &SlabState| {
                    let t = s.slab.tenant();
                    s.carved < s.slab.slots() && (t == 0 || t == tenant)
                };
                if let Some(s) = st.slabs.iter_mut().find(|s| usable(s)) {
                    if tenant != 0 {
                        s.slab.bind(tenant);
                    }
                    s.carved += 1;
                    break Slot::carve(s.slab.clone(), s.carved - 1);
                }
            }
            // Created outside the lock; a concurrent carver may create one too, which only adds room.
            let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            let slab = Arc::new(Slab::create(id, cap, slots, &self.inner.config.segment)?);
            lock(&self.inner.ranges).insert(id, slab.range());
            tracing::debug!(slot = cap, slots, "pool created a slab");
            lock(&class.state).slabs.push(SlabState { slab, carved: 0 });
        };
        if self.inner.config.segment.prefaults() {
            slot.prefault(touch).map_err(|e| Error::os("madvise(MADV_POPULATE_WRITE)", Backend::Memfd, e))?;
        }
        let generation = slot.slab().next_generation();
        Ok(Buffer::new(slot.slab().id(), generation, Storage::Slot(slot)))
    }

    /// A new tenant of this pool: [`Pool::try_alloc_for`] gives it buffers only from segments no other tenant's
    /// buffers have used. Until [`Pool::retire`]d, its segments stay its own (idle or not); afterwards they are
    /// dropped as soon as they are idle, never reused.
    pub fn tenant(&self) -> Tenant {
        let t = self.inner.next_tenant.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.tenants).insert(t);
        Tenant(t)
    }

    /// Ends `tenant` (its peer is gone, or may still map its segments but will get nothing more): its idle buffers
    /// are dropped now, the others as they come back. Their memory goes back to the system.
    pub fn retire(&self, tenant: Tenant) {
        if !lock(&self.inner.tenants).remove(&tenant.0) {
            return;
        }
        for class in 0..self.inner.classes.len() {
            self.drop_tenant_buffers(class, tenant.0);
        }
    }

    /// A handle that does not keep the pool alive (for maintenance tasks such as a periodic [`Pool::trim_idle`]).
    pub fn downgrade(&self) -> WeakPool {
        WeakPool { inner: Arc::downgrade(&self.inner) }
    }

    /// Woken whenever a buffer comes back to the pool (for async waits outside the pool, such as a call waiting
    /// for room before its first message).
    pub(crate) fn returns(&self) -> &Arc<Notify> {
        &self.inner.returns
    }

    /// How many times a buffer has come back to the pool so far: an allocation that failed at count `n` may succeed
    /// once the count has moved.
    pub(crate) fn returned(&self) -> u64 {
        *lock(&self.inner.returns_sync.0)
    }

    /// Whether the segment `id` ([`Lease::id`]) still exists, idle or in use; false once the pool dropped it (to
    /// make room, or by [`Pool::trim`]).
    ///
    /// Part of the API for code that shares the pool's segments with another process by id (as the gRPC layer
    /// does): a segment the pool dropped lives on in the peer's mapping until the peer is told to unmap it, and
    /// [`Pool::evictions`] says when it is worth looking.
    pub fn exists(&self, id: u32) -> bool {
        lock(&self.inner.ranges).contains_key(&id)
    }

    /// How many idle buffers were dropped so far (to make room, or by [`Pool::trim`]).
    pub fn evictions(&self) -> u64 {
        self.inner.counters.evictions.load(Ordering::Relaxed)
    }

    /// Whether `data` lies inside one of this pool's buffers.
    pub fn contains(&self, data: &[u8]) -> bool {
        let (p, n) = (data.as_ptr() as usize, data.len());
        lock(&self.inner.ranges).values().any(|&(base, len)| p >= base && p + n <= base + len)
    }

    /// Returns a buffer to its class and wakes waiters.
    fn put_back(&self, class: usize, mut buffer: Buffer) {
        buffer.idle_since = Instant::now();
        let tenant = buffer.tenant();
        let retired = tenant != 0 && !lock(&self.inner.tenants).contains(&tenant);
        {
            let mut st = lock(&self.inner.classes[class].state);
            st.in_use_bytes -= buffer.capacity() as u64;
            self.inner.in_use.fetch_sub(buffer.capacity() as u64, Ordering::AcqRel);
            gauges(-(buffer.capacity() as i64), buffer.capacity() as i64);
            st.free.push(buffer);
        }
        if retired {
            // Nobody may use it again (its tenant's peer may still map it): it goes as soon as it is idle.
            self.drop_tenant_buffers(class, tenant);
        }
        // The count moves before anyone is woken: a waiter that wakes and reads it must see the return.
        let (count, cv) = &self.inner.returns_sync;
        *lock(count) += 1;
        self.inner.returns.notify_waiters();
        cv.notify_all();
    }

    /// A snapshot of the pool's figures (the seed's `MemPoolInfo`). Each class is read under its own lock, so
    /// figures of different classes may be from slightly different instants while allocations run.
    pub fn stats(&self) -> PoolStats {
        let classes: Vec<ClassStats> = self
            .inner
            .classes
            .iter()
            .map(|c| {
                let st = lock(&c.state);
                ClassStats {
                    size: c.size,
                    total: st.total,
                    free: st.free.len(),
                    in_use: st.total - st.free.len(),
                    bytes: st.bytes,
                    in_use_bytes: st.in_use_bytes,
                }
            })
            .collect();
        let c = &self.inner.counters;
        PoolStats {
            budget: self.inner.config.budget,
            bytes: classes.iter().map(|c| c.bytes).sum(),
            in_use_bytes: classes.iter().map(|c| c.in_use_bytes).sum(),
            allocs: c.allocs.load(Ordering::Relaxed),
            grows: c.grows.load(Ordering::Relaxed),
            waits: c.waits.load(Ordering::Relaxed),
            exhausted: c.exhausted.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            trimmed_bytes: c.trimmed_bytes.load(Ordering::Relaxed),
            classes,
        }
    }
}
