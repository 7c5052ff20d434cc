"""Transfer counters (kept by the Rust core): what went through shared memory, what went inline and why."""

from __future__ import annotations

from enum import Enum

from . import _core


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
    WINDOW_FULL = "window_full"
    SHARE_EXCEEDED = "share_exceeded"


def stats() -> dict[str, object]:
    """
    The process-wide counters (Python and Rust channels and servers of this process together): ``shm_sent``,
    ``shm_sent_bytes``, ``shm_received``, ``shm_received_bytes``, the same four for ``inline_``, ``bad_references``,
    ``bad_releases``, ``peer_refusals``, ``window_waits``, ``pool_waits``, ``lost_in_flight`` and ``fallbacks``
    (reason label to count).
    """
    return _core.stats()
