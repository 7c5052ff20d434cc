"""
shmgrpc for grpcio: gRPC over shared memory between co-located peers, on the Rust core of the ``shmgrpc`` crate.

- :func:`insecure_channel`: a drop-in for ``grpc.insecure_channel`` (generated stubs work unchanged).
- :func:`server`: a drop-in for ``grpc.server``.
- :mod:`shmgrpc.aio`: ``insecure_channel`` for ``grpc.aio`` (nothing blocks the event loop).
- :func:`stats`: process-wide transfer counters (:class:`Stats`); :class:`Fallback`: why a message went inline.
- :meth:`ShmChannel.loan` / :func:`loan` (in a handler) and :func:`loaned`: write a large ``bytes`` field in place
  (a :class:`Loan` supports the buffer protocol: ``np.ndarray(shape, dtype, buffer=loan)``) and send it without a
  copy; ``views=`` on :func:`insecure_channel` reads a large response field in place (:class:`View`).

The protocol (sessions, the side channel, the pool, references, releases, limits) is implemented once, in Rust
(:mod:`shmgrpc._core`, built by maturin); this package is the grpcio glue. ``docs/python.md`` in the repository says
what is copied where; ``docs/protocol.md`` is the protocol.
"""

from typing import Any

from ._codec import Loaned, View
from ._core import DEFAULT_THRESHOLD, SESSION_HEADER, Loan
from ._core import PROTOCOL_VERSION as CORE_PROTOCOL_VERSION
from .client import PROTOCOL_VERSION, PoolStats, ShmChannel, insecure_channel
from .server import ShmServer, loan, server
from .stats import Fallback, Stats, stats


def loaned(message: Any, field: str, loan: Loan | View) -> Loaned:
    """
    ``message`` with its ``bytes`` field ``field`` (left unset) carried by ``loan``: pass it to a stub (or return
    it from a handler) in place of the message, and the loan's bytes go out in place (no copy through shared
    memory). A received :class:`View` works too: its bytes go back to their sender in place (an echo or a forward
    without a copy).
    """
    return Loaned(message, field, loan)


__version__ = "0.1.0"

__all__ = [
    "CORE_PROTOCOL_VERSION",
    "DEFAULT_THRESHOLD",
    "PROTOCOL_VERSION",
    "SESSION_HEADER",
    "Fallback",
    "Loan",
    "Loaned",
    "PoolStats",
    "ShmChannel",
    "ShmServer",
    "Stats",
    "View",
    "insecure_channel",
    "loan",
    "loaned",
    "server",
    "stats",
]
