"""Hostile references get the protocol's status (``docs/protocol.md`` section 9) from both implementations, and the
server keeps serving. The same cases run against ``shmgrpc serve`` (Rust) and the Python server."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

import shmgrpc

from .conftest import Served, _start, _stop, encode_reference, start_py_server

ECHO = "/shmgrpc.demo.v1.Blob/Echo"


@pytest.fixture(params=["rust", "python"])
def server(request: Any, bin_path: str, stubs_dir: str, tmp_path: Any) -> Iterator[Served]:
    unix = f"unix:{tmp_path / 'h.sock'}"
    s = (
        _start([bin_path, "serve", "--listen", unix], unix)
        if request.param == "rust"
        else start_py_server(stubs_dir, unix)
    )
    yield s
    _stop(s)


def test_hostile_references_get_clear_statuses(server: Served, blob: Any, blob_grpc: Any, wire: Any) -> None:
    def ref(session: bytes, parts: list[Any], from_server: bool = False) -> bytes:
        return encode_reference(wire, session, parts, from_server)

    def sender(segment: int, offset: int, length: int, generation: int = 1) -> Any:
        return wire.Part(sender=wire.Region(segment=segment, generation=generation, offset=offset, len=length))

    with shmgrpc.insecure_channel(server.unix) as ch:
        assert ch.is_shared_memory(), ch.fallback()
        # A legitimate call registers our first buffer (segment 1, a 2 MiB buffer) with the server.
        data = os.urandom(1 << 20)
        good = blob_grpc.BlobStub(ch)
        assert good.Echo(blob.Payload(data=data, crc32=zlib.crc32(data))).data == data
        session = ch._session
        assert session is not None
        sid = bytes.fromhex(session.header)
        md = [(shmgrpc.SESSION_HEADER, session.header)]
        raw = ch._channel.unary_unary(ECHO)

        def status(body: bytes) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as e:
                raw(body, metadata=md, timeout=10)
            assert "shmgrpc-" not in (e.value.details() or ""), "no segment name in a status"
            return e.value.code()

        inline_part = wire.Part(inline=b"x")
        cases = [
            ("malformed", b"\xfa\xe1\x09\x05ab", grpc.StatusCode.INVALID_ARGUMENT),
            ("unknown session", ref(b"\x01" * 16, [sender(1, 0, 16)]), grpc.StatusCode.FAILED_PRECONDITION),
            ("short session id", ref(b"\x01" * 3, [sender(1, 0, 16)]), grpc.StatusCode.FAILED_PRECONDITION),
            ("claims to be the server", ref(sid, [sender(1, 0, 16)], True), grpc.StatusCode.FAILED_PRECONDITION),
            ("no parts", ref(sid, []), grpc.StatusCode.INVALID_ARGUMENT),
            ("65 parts", ref(sid, [inline_part] * 65), grpc.StatusCode.INVALID_ARGUMENT),
            ("a part without a kind", ref(sid, [wire.Part()]), grpc.StatusCode.INVALID_ARGUMENT),
            ("too many inline bytes", ref(sid, [wire.Part(inline=b"x" * 33000)]), grpc.StatusCode.INVALID_ARGUMENT),
            ("past the segment's end", ref(sid, [sender(1, 1 << 40, 16)]), grpc.StatusCode.OUT_OF_RANGE),
            ("offset overflow", ref(sid, [sender(1, 2**64 - 8, 16)]), grpc.StatusCode.OUT_OF_RANGE),
            (
                "a receiver part the peer does not hold",
                ref(sid, [wire.Part(receiver=wire.Region(segment=1, generation=77, offset=0, len=8))]),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            ("trailing fields", ref(sid, [sender(1, 0, 16)]) + b"\x08\x01", grpc.StatusCode.INVALID_ARGUMENT),
            # 16 real bytes of our buffer: the start of a 1 MiB Payload, which does not decode from 16 bytes.
            ("bytes that do not decode", ref(sid, [sender(1, 0, 16)]), grpc.StatusCode.INVALID_ARGUMENT),
            ("inline bytes that do not decode", b"\x0a\xff\x01", grpc.StatusCode.INVALID_ARGUMENT),
            # A segment never registered: held back for the registration wait (2 s), then refused.
            ("an unregistered segment", ref(sid, [sender(999, 0, 16)]), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for what, body, code in cases:
            assert status(body) == code, what
        # The server is still up and serves this client and a fresh one through shared memory.
        assert good.Echo(blob.Payload(data=data, crc32=zlib.crc32(data))).data == data
        with shmgrpc.insecure_channel(server.unix) as other:
            assert other.is_shared_memory()
            assert blob_grpc.BlobStub(other).Echo(blob.Payload(data=data)).data == data
            assert other.stats()["shm_sent"] == 1
