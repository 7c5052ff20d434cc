"""
shmgrpc for grpcio: gRPC over shared memory between co-located peers, speaking the protocol of the Rust crate.

- :func:`insecure_channel`: a drop-in for ``grpc.insecure_channel`` (generated stubs work unchanged).
- :func:`server`: a drop-in for ``grpc.server``.
- :mod:`shmgrpc.aio`: ``insecure_channel`` for ``grpc.aio`` (nothing blocks the event loop).
- :func:`stats`: process-wide transfer counters; :class:`Fallback`: why a message went inline.
- :meth:`ShmChannel.loan` / :func:`loan` (in a handler) and :func:`loaned`: write a large ``bytes`` field in place
  and send it without a copy; ``views=`` on :func:`insecure_channel` reads a large response field in place
  (:class:`View`).

The protocol is ``docs/protocol.md`` (version 2) in the repository; ``docs/python.md`` says what is copied where.
"""

from typing import Any

from .client import ShmChannel, insecure_channel
from .pool import Pool, PoolExhausted
from .protocol import PROTOCOL_VERSION
from .server import ShmServer, loan, server
from .session import Loan, Loaned, View
from .stats import Fallback, stats


def loaned(message: Any, field: str, loan: Loan) -> Loaned:
    """
    ``message`` with its ``bytes`` field ``field`` (left unset) carried by ``loan``: pass it to a stub in place
    of the message, and the loan's bytes go out in place (no copy through shared memory).
    """
    return Loaned(message, field, loan)


__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "Fallback",
    "Loan",
    "Loaned",
    "Pool",
    "PoolExhausted",
    "ShmChannel",
    "ShmServer",
    "View",
    "insecure_channel",
    "loan",
    "loaned",
    "server",
    "stats",
]
