//! Lock helpers shared by every layer: the one place that decides what a poisoned lock means.
//!
//! Every lock in this crate guards data that each critical section updates in a single step (a push, a pop, an
//! insert, a counter), so a panic while one is held cannot leave it half-written. A poisoned lock is therefore
//! taken as it is instead of spreading the panic to every later caller (a codec, a `Drop`, the I/O thread).

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, taking a poisoned lock as it is (see the module docs).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-locks `l`, taking a poisoned lock as it is.
#[cfg_attr(not(feature = "grpc"), allow(dead_code))]
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks `l`, taking a poisoned lock as it is.
#[cfg_attr(not(feature = "grpc"), allow(dead_code))]
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
