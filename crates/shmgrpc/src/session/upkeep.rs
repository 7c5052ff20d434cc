//! Upkeep on the I/O runtime: now and then the pools of this process's sessions give back buffers that have been
//! idle for longer than their idle period ([`Pool::trim_idle`]), and every session tells its peer to forget the
//! segments its pool dropped, so that the peer's mapping does not keep their memory alive.

use std::sync::Mutex;
use std::time::Duration;

use super::{REGISTRY, Session};
use crate::pool::{Pool, WeakPool};
use crate::sync::lock;

/// The pools of this process's sessions, and whether the upkeep task runs. Global because there is one I/O
/// runtime, and one task on it serves every pool.
static WATCHED: Mutex<Watched> = Mutex::new(Watched { pools: Vec::new(), running: false });

struct Watched {
    pools: Vec<WeakPool>,
    running: bool,
}

/// The shortest and longest pause between two rounds.
const MIN_TICK: Duration = Duration::from_millis(50);
const MAX_TICK: Duration = Duration::from_secs(1);

/// Has `pool` trimmed from now on (once per pool, whatever the number of its sessions).
pub(super) fn watch(pool: &Pool) {
    if pool.config().idle_release_period().is_none() {
        return;
    }
    let mut w = lock(&WATCHED);
    w.pools.retain(|p| p.upgrade().is_some());
    if !w.pools.iter().any(|p| p.points_to(pool)) {
        w.pools.push(pool.downgrade());
    }
    if !w.running {
        match crate::io::spawn(run()) {
            Ok(_) => w.running = true,
            Err(e) => tracing::debug!(error = %e, "no upkeep task: idle pool memory is not given back"),
        }
    }
}

/// One round every tick: half the shortest idle period among the pools, within [`MIN_TICK`, `MAX_TICK`]. Ends
/// when no pool is left (the next `watch` starts it again).
async fn run() {
    loop {
        let pools: Vec<Pool> = {
            let mut w = lock(&WATCHED);
            let pools: Vec<Pool> = w.pools.iter().filter_map(WeakPool::upgrade).collect();
            w.pools.retain(|p| p.upgrade().is_some());
            if pools.is_empty() {
                w.running = false;
                return;
            }
            pools
        };
        let tick = pools
            .iter()
            .filter_map(|p| p.config().idle_release_period())
            .min()
            .map_or(MAX_TICK, |d| (d / 2).clamp(MIN_TICK, MAX_TICK));
        let trimmed: u64 = pools.iter().map(Pool::trim_idle).sum();
        drop(pools);
        if trimmed > 0 {
            let sessions: Vec<std::sync::Arc<Session>> =
                lock(&REGISTRY).values().filter_map(std::sync::Weak::upgrade).collect();
            for s in sessions {
                s.sender.forget_evicted();
            }
        }
        tokio::time::sleep(tick).await;
    }
}
