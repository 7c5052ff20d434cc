"""
The shmgrpc wire protocol (``docs/protocol.md``, version 2): constants, message classes, references, frames.

Everything a peer sends is checked here before anything else looks at it; limits are the Rust implementation's
(``crates/shmgrpc/src/protocol.rs``), so both implementations refuse the same inputs.
"""

from __future__ import annotations

import struct
from typing import Any

from google.protobuf import descriptor_pool, message_factory

from ._descriptor import SERIALIZED

PROTOCOL_VERSION = 2
"""The highest protocol version this package speaks."""
MIN_PROTOCOL_VERSION = 2
"""The lowest protocol version this package speaks."""
SESSION_HEADER = "shmgrpc-session"
"""Request metadata naming the caller's session (32 lowercase hex digits)."""
HELLO_PATH = "/shmgrpc.v1.Session/Hello"
"""The discovery method."""
HANDSHAKE_TIMEOUT = 5.0
"""Seconds each discovery and handshake step may take."""
REGISTRATION_WAIT = 2.0
"""Seconds a reference may wait for the registration of a segment it names (protocol section 6)."""
TICKET_TTL = 30.0
"""Seconds a discovery ticket stays valid."""
MAX_TICKET_LEN = 64
"""Longest ticket a client accepts."""
CHALLENGE_LEN = 32
"""Bytes of the handshake challenge."""
MAX_FRAME_LEN = 64 * 1024
"""Longest side-channel frame."""
MAX_REFERENCE_LEN = 40 * 1024
"""Longest reference message."""
MAX_PARTS = 64
"""Most parts in one reference."""
MAX_INLINE = 32 * 1024
"""Most inline bytes in one reference."""
MAX_PEER_SEGMENTS = 4096
"""Most segments a peer may register in one session."""
MAX_SESSION_PEER_BYTES = 64 << 30
"""Most bytes of peer segments mapped for one session."""
DEFAULT_THRESHOLD = 64 * 1024
"""Messages whose encoded size reaches this go through shared memory."""
REFERENCE_KEY = b"\xfa\xe1\x09"
"""The first bytes of every reference: the key of field 19999, wire type 2."""

_POOL = descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(SERIALIZED)


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"shmgrpc.v1.{name}"))


HelloRequest: Any = _message("HelloRequest")
HelloResponse: Any = _message("HelloResponse")
SideMessage: Any = _message("SideMessage")
Attach: Any = _message("Attach")
Challenge: Any = _message("Challenge")
Proof: Any = _message("Proof")
Welcome: Any = _message("Welcome")
Register: Any = _message("Register")
Registered: Any = _message("Registered")
Release: Any = _message("Release")
Returned: Any = _message("Returned")
Forget: Any = _message("Forget")
Refused: Any = _message("Refused")
Reference: Any = _message("Reference")
Part: Any = _message("Part")
Region: Any = _message("Region")


class ProtocolError(Exception):
    """A peer broke the protocol; the session ends."""


class BadReference(Exception):
    """A reference that cannot be resolved; carries the gRPC status code name the protocol gives it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_reference(data: bytes | memoryview) -> bool:
    """Whether a gRPC message is a reference rather than an ordinary message."""
    return data[:3] == REFERENCE_KEY


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[pos:]`` (not past ``end``) and the position after it; ``ValueError`` when truncated."""
    n = shift = 0
    while pos < end and shift < 64:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7
    raise ValueError("truncated varint")


def encode_reference(reference: Any) -> bytes:
    """A reference as a gRPC message: field 19999 holding the ``Reference``."""
    body = reference.SerializeToString()
    return REFERENCE_KEY + _varint(len(body)) + body


def decode_reference(data: bytes) -> Any:
    """Parses a reference message; anything but exactly one field 19999 is refused (``INVALID_ARGUMENT``)."""
    if len(data) > MAX_REFERENCE_LEN:
        raise BadReference("INVALID_ARGUMENT", "bad shmgrpc reference: too long")
    if not is_reference(data):
        raise BadReference("INVALID_ARGUMENT", "bad shmgrpc reference: not a reference")
    try:
        n, pos = read_varint(data, 3, len(data))
    except ValueError:
        raise BadReference("INVALID_ARGUMENT", "bad shmgrpc reference: truncated length") from None
    if pos + n != len(data):
        raise BadReference("INVALID_ARGUMENT", "bad shmgrpc reference: length does not match")
    r = Reference()
    try:
        r.ParseFromString(data[pos:])
    except Exception as e:  # protobuf raises DecodeError, or others on odd input
        raise BadReference("INVALID_ARGUMENT", f"bad shmgrpc reference: {e}") from None
    return r


def encode_frame(message: Any) -> bytes:
    """A side-channel frame: 4-byte little-endian length, then the ``SideMessage``."""
    body = message.SerializeToString()
    if len(body) > MAX_FRAME_LEN:
        raise ProtocolError("frame too long")
    return struct.pack("<I", len(body)) + body


def side(**kind: Any) -> Any:
    """A ``SideMessage`` with one kind set, for example ``side(release=Release(segment=1, generation=2))``."""
    m = SideMessage()
    ((name, value),) = kind.items()
    getattr(m, name).CopyFrom(value)
    return m
