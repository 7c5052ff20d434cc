"""Process-wide transfer counters: what went through shared memory, what went inline and why."""

from __future__ import annotations

import threading
from enum import Enum


class Fallback(Enum):
    """Why a message that could have gone through shared memory went inline (the Rust ``Fallback``'s labels)."""

    PEER_LACKS_SHMGRPC = "peer_lacks_shmgrpc"
    DISCOVERY_FAILED = "discovery_failed"
    UNSUPPORTED_VERSION = "unsupported_version"
    SIDE_CHANNEL_UNREACHABLE = "side_channel_unreachable"
    HANDSHAKE_FAILED = "handshake_failed"
    SESSION_CLOSED = "session_closed"
    POOL_EXHAUSTED = "pool_exhausted"
    REGISTRATION_FAILED = "registration_failed"


_MESSAGE_SLOTS = {
    ("sent", "shm"): 0,
    ("received", "shm"): 2,
    ("sent", "inline"): 4,
    ("received", "inline"): 6,
}
_SLOT_NAMES = (
    "shm_sent",
    "shm_sent_bytes",
    "shm_received",
    "shm_received_bytes",
    "inline_sent",
    "inline_sent_bytes",
    "inline_received",
    "inline_received_bytes",
)


class Recorder:
    """Counters of one channel or server, or of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages = [0] * len(_SLOT_NAMES)
        self._c: dict[str, int] = {}

    def add(self, key: str, n: int = 1) -> None:
        """Adds ``n`` to counter ``key``."""
        with self._lock:
            self._c[key] = self._c.get(key, 0) + n

    def message(self, direction: str, path: str, nbytes: int) -> None:
        """Counts one message: ``direction`` is ``sent`` or ``received``, ``path`` ``shm`` or ``inline``."""
        i = _MESSAGE_SLOTS[(direction, path)]
        with self._lock:
            m = self._messages
            m[i] += 1
            m[i + 1] += nbytes

    def snapshot(self) -> dict[str, object]:
        """
        The counters: ``shm_sent``, ``shm_sent_bytes``, ``shm_received``, ..., ``inline_received_bytes``,
        ``bad_references``, ``bad_releases``, ``peer_refusals`` and ``fallbacks`` (reason label to count).
        """
        with self._lock:
            c = dict(self._c)
            m = list(self._messages)
        out: dict[str, object] = dict(zip(_SLOT_NAMES, m))
        for k in ("bad_references", "bad_releases", "peer_refusals"):
            out[k] = c.get(k, 0)
        out["fallbacks"] = {f.value: c.get(f"fallback:{f.value}", 0) for f in Fallback}
        return out


GLOBAL = Recorder()


class Both:
    """Counts into one channel's or server's recorder and the process-wide one."""

    def __init__(self, own: Recorder) -> None:
        self.own = own

    def add(self, key: str, n: int = 1) -> None:
        """See :meth:`Recorder.add`."""
        self.own.add(key, n)
        GLOBAL.add(key, n)

    def message(self, direction: str, path: str, nbytes: int) -> None:
        """See :meth:`Recorder.message`."""
        i = _MESSAGE_SLOTS[(direction, path)]
        for r in (self.own, GLOBAL):
            with r._lock:
                m = r._messages
                m[i] += 1
                m[i + 1] += nbytes

    def fallback(self, reason: Fallback) -> None:
        """Counts one message at or above the threshold that went inline."""
        self.add(f"fallback:{reason.value}")


def stats() -> dict[str, object]:
    """The process-wide counters (see :meth:`Recorder.snapshot`)."""
    return GLOBAL.snapshot()
