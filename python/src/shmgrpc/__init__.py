"""
shmgrpc for grpcio: gRPC over shared memory between co-located peers, speaking the protocol of the Rust crate.

- :func:`insecure_channel`: a drop-in for ``grpc.insecure_channel`` (generated stubs work unchanged).
- :func:`server`: a drop-in for ``grpc.server``.
- :func:`stats`: process-wide transfer counters; :class:`Fallback`: why a message went inline.

The protocol is ``docs/protocol.md`` (version 2) in the repository; ``docs/python.md`` says what is copied where.
"""

from .client import ShmChannel, insecure_channel
from .pool import Pool, PoolExhausted
from .protocol import PROTOCOL_VERSION
from .server import ShmServer, server
from .stats import Fallback, stats

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "Fallback",
    "Pool",
    "PoolExhausted",
    "ShmChannel",
    "ShmServer",
    "insecure_channel",
    "server",
    "stats",
]
