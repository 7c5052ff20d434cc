"""Transfer counters (kept by the Rust core): what went through shared memory, what went inline and why."""

from __future__ import annotations

from enum import Enum
from typing import TypedDict

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


class Stats(TypedDict):
    """
    Transfer counters, as :func:`stats`, ``ShmChannel.stats()`` and ``ShmServer.stats()`` give them (a plain
    ``dict`` at run time; the Rust core's ``Recorder`` counts them).
    """

    shm_sent: int
    """Messages sent through shared memory (a reference went on the wire)."""
    shm_sent_bytes: int
    shm_received: int
    """Messages received as references and resolved."""
    shm_received_bytes: int
    inline_sent: int
    """Messages sent inline: below the threshold, or for a reason counted in ``fallbacks``."""
    inline_sent_bytes: int
    inline_received: int
    inline_received_bytes: int
    bad_references: int
    """References from a peer that did not resolve (each failed its call with a status)."""
    bad_releases: int
    """Releases from a peer that named nothing it held."""
    peer_refusals: int
    """Registrations the peer refused."""
    window_waits: int
    """Large messages that waited for the peer to release (a full in-flight window)."""
    pool_waits: int
    """Allocations that waited for a pool buffer."""
    lost_in_flight: int
    """Messages in shared memory whose receiver never read them (their call ended first)."""
    fallbacks: dict[str, int]
    """Messages that went inline although large, by reason (:class:`Fallback` labels)."""


def stats() -> Stats:
    """The process-wide counters (of every channel and server of this process, Python and Rust): :class:`Stats`."""
    return _core.stats()
