//! The attach cache: the receiving side's map of peer segments (the seed's `SharedMemoryManager`).
//!
//! A peer's segment is opened and mapped once, then reused for every message that refers to it: a fresh `mmap`
//! per message is what erases the gain of shared memory. Entries are `Arc<PeerSegment>`, so detaching never pulls
//! a mapping out from under a reader still holding it: the mapping goes when the last holder drops it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::segment::{PeerSegment, SegmentHandle};

/// Hit and miss counts and mapped bytes of an [`AttachCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AttachStats {
    /// Segments mapped right now.
    pub segments: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Lookups served by an existing mapping.
    pub hits: u64,
    /// Lookups that had to open and map.
    pub misses: u64,
}

/// Mapped peer segments by key (a POSIX name, a System V id, or a session's own segment number).
#[derive(Debug)]
pub struct AttachCache<K> {
    entries: Mutex<HashMap<K, Arc<PeerSegment>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl<K> Default for AttachCache<K> {
    fn default() -> Self {
        AttachCache { entries: Mutex::new(HashMap::new()), hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }
}

impl<K: Eq + Hash + Clone> AttachCache<K> {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<K, Arc<PeerSegment>>> {
        crate::sync::lock(&self.entries)
    }

    /// The mapping of `key`, opening it with `handle()` and checking `claimed_len` on first use.
    ///
    /// A cached segment shorter than `claimed_len` is an error: a segment never grows under the same key.
    pub fn attach(
        &self,
        key: K,
        claimed_len: u64,
        handle: impl FnOnce() -> Result<SegmentHandle>,
    ) -> Result<Arc<PeerSegment>> {
        if let Some(seg) = self.get(&key) {
            if claimed_len > seg.len() as u64 {
                return Err(Error::SizeMismatch {
                    backend: seg.backend(),
                    claimed: claimed_len,
                    actual: seg.len() as u64,
                });
            }
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(seg);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Open and map outside the lock; if another thread won the race, its mapping is kept and ours dropped.
        let seg = Arc::new(PeerSegment::open(handle()?, claimed_len)?);
        Ok(self.entries().entry(key).or_insert(seg).clone())
    }

    /// Caches an already opened segment (for example one whose descriptor just arrived), replacing any other
    /// under the same key.
    pub fn insert(&self, key: K, segment: PeerSegment) -> Arc<PeerSegment> {
        let seg = Arc::new(segment);
        self.entries().insert(key, seg.clone());
        seg
    }

    /// The cached mapping of `key`, if any (counts neither as hit nor as miss).
    pub fn get(&self, key: &K) -> Option<Arc<PeerSegment>> {
        self.entries().get(key).cloned()
    }

    /// Forgets `key`. The mapping itself goes once no reader holds it. Returns whether it was cached.
    pub fn detach(&self, key: &K) -> bool {
        self.entries().remove(key).is_some()
    }

    /// Forgets every segment whose creator process no longer exists (where the creator is known). Returns how many.
    pub fn detach_dead_creators(&self) -> usize {
        let mut entries = self.entries();
        let before = entries.len();
        entries.retain(|_, seg| seg.creator_pid().is_none_or(crate::inventory::process_alive));
        before - entries.len()
    }

    /// Forgets everything (the owner went away).
    pub fn clear(&self) {
        self.entries().clear();
    }

    /// Whether `data` lies entirely inside one of the cached mappings.
    pub fn contains(&self, data: &[u8]) -> bool {
        let (p, n) = (data.as_ptr() as usize, data.len());
        self.entries().values().any(|s| {
            let base = s.as_slice().as_ptr() as usize;
            p >= base && p + n <= base + s.len()
        })
    }

    /// Number of cached segments.
    pub fn len(&self) -> usize {
        self.entries().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries().is_empty()
    }

    /// Current figures.
    pub fn stats(&self) -> AttachStats {
        let entries = self.entries();
        AttachStats {
            segments: entries.len(),
            bytes: entries.values().map(|s| s.len() as u64).sum(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}
