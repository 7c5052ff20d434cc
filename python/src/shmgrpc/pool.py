"""
A size-class pool of shared-memory buffers (one sealed memfd per buffer), bounded by a byte budget.

A :class:`Lease` is exclusive use of one buffer: its ``(segment, generation)`` names this use and no other, so a
stale or repeated release from a peer can never free a reused buffer. Buffers return to their class on
:meth:`Lease.release`; idle buffers of other classes are dropped when room is needed.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from .segment import Segment

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
DEFAULT_CLASSES = tuple(64 * KIB << i for i in range(15))  # 64 KiB .. 1 GiB
DEFAULT_BUDGET = 4 * GIB
MAX_EVICTED = 4096


class PoolExhausted(Exception):
    """No buffer within the budget."""


@dataclass
class PoolStats:
    """A snapshot of a pool."""

    budget: int
    bytes: int
    in_use_bytes: int
    buffers: int
    allocs: int
    grows: int


class Lease:
    """Exclusive use of one pool buffer; ``view`` is its writable memory. Return it with :meth:`release`."""

    def __init__(self, pool: Pool, segment_id: int, segment: Segment, generation: int, length: int) -> None:
        self.pool = pool
        self.segment_id = segment_id
        self.segment = segment
        self.generation = generation
        self.length = length
        self.view = segment.view[:length]
        self._released = False

    def release(self) -> None:
        """Returns the buffer to the pool (idempotent)."""
        if self._released:
            return
        self._released = True
        self.view.release()
        self.pool._put_back(self.segment_id, self.segment)


class Pool:
    """A pool of sealed memfd buffers in power-of-two classes, at most ``budget`` bytes in all."""

    def __init__(self, budget: int = DEFAULT_BUDGET, classes: tuple[int, ...] = DEFAULT_CLASSES) -> None:
        self.budget = budget
        self.classes = tuple(sorted(classes))
        self._lock = threading.Lock()
        self._free: dict[int, list[tuple[int, Segment]]] = {c: [] for c in self.classes}
        self._ids = itertools.count(1)
        self._generations = itertools.count(1)
        self._bytes = 0
        self._in_use = 0
        self._buffers = 0
        self._allocs = 0
        self._grows = 0
        self._evicted: list[int] = []  # ids of buffers dropped, in order (the last MAX_EVICTED)
        self._evictions = 0

    def _class_for(self, size: int) -> int:
        for c in self.classes:
            if c >= size:
                return c
        page = 4096
        return (size + page - 1) // page * page

    def alloc(self, size: int) -> Lease:
        """
        A buffer of at least ``size`` bytes, best fit; grows within the budget, dropping idle buffers if needed.

        Raises :class:`PoolExhausted` when the budget cannot hold it.
        """
        if size <= 0:
            raise ValueError("size must be positive")
        cap = self._class_for(size)
        with self._lock:
            self._allocs += 1
            free = self._free.setdefault(cap, [])
            if free:
                sid, seg = free.pop()
                self._in_use += cap
                return Lease(self, sid, seg, next(self._generations), size)
            if self._bytes + cap > self.budget:
                self._evict(self._bytes + cap - self.budget)
            if self._bytes + cap > self.budget:
                raise PoolExhausted(f"{size} bytes requested, {self._in_use} of {self.budget} budget bytes in use")
            self._bytes += cap
            self._in_use += cap
            self._buffers += 1
            self._grows += 1
            sid = next(self._ids)
        try:
            seg = Segment(cap)
        except BaseException:
            with self._lock:
                self._bytes -= cap
                self._in_use -= cap
                self._buffers -= 1
            raise
        return Lease(self, sid, seg, next(self._generations), size)

    def _evict(self, needed: int) -> None:
        """Drops idle buffers, largest first, until ``needed`` bytes are free (called with the lock held)."""
        for cap in sorted(self._free, reverse=True):
            free = self._free[cap]
            while free and needed > 0:
                sid, seg = free.pop()
                seg.close()
                self._bytes -= cap
                self._buffers -= 1
                needed -= cap
                self._evictions += 1
                self._evicted.append(sid)
                if len(self._evicted) > MAX_EVICTED:
                    del self._evicted[: len(self._evicted) - MAX_EVICTED]

    def _put_back(self, segment_id: int, segment: Segment) -> None:
        with self._lock:
            self._in_use -= segment.size
            self._free.setdefault(segment.size, []).append((segment_id, segment))

    def evicted_since(self, seen: int) -> tuple[int, list[int]]:
        """
        The eviction count now, and the ids of buffers dropped after count ``seen`` (at most the last
        :data:`MAX_EVICTED`): sessions tell their peers to forget those segments.
        """
        with self._lock:
            n = self._evictions
            k = min(n - seen, len(self._evicted))
            return n, self._evicted[len(self._evicted) - k :] if k > 0 else []

    def exists(self, segment_id: int) -> bool:
        """Whether buffer ``segment_id`` still exists (idle or leased)."""
        with self._lock:
            if any(sid == segment_id for free in self._free.values() for sid, _ in free):
                return True
        return False

    def stats(self) -> PoolStats:
        """Current figures."""
        with self._lock:
            return PoolStats(self.budget, self._bytes, self._in_use, self._buffers, self._allocs, self._grows)

    def close(self) -> None:
        """Drops every idle buffer."""
        with self._lock:
            self._evict(self._bytes)
