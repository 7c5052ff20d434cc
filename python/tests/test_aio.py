"""The asyncio client (``shmgrpc.aio``) with the Rust server: every RPC kind through shared memory, nothing
blocking the event loop, fallback against a plain server."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import pytest

import shmgrpc
import shmgrpc.aio

from .conftest import Served, without_python_encoder

MIB = 1 << 20


def payload(blob: Any, size: int, seed: int) -> Any:
    data = bytes([seed & 0xFF]) * size
    return blob.Payload(data=data, crc32=zlib.crc32(data))


def test_aio_client_all_rpc_kinds(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    async def main() -> None:
        async with shmgrpc.aio.insecure_channel(rust_server.unix) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            stub = blob_grpc.BlobStub(ch)
            p = payload(blob, 2 * MIB, 1)
            r = await stub.Echo(p)
            assert r.data == p.data
            assert (await stub.Upload(payload(blob, 2 * MIB, 2))).via_shm
            d = await stub.Download(blob.DownloadRequest(size=3 * MIB, seed=3, count=1))
            assert len(d.data) == 3 * MIB and zlib.crc32(d.data) == d.crc32
            got = [x async for x in stub.DownloadStream(blob.DownloadRequest(size=MIB, seed=4, count=4))]
            assert len(got) == 4 and all(zlib.crc32(x.data) == x.crc32 for x in got)
            frames = [payload(blob, MIB, 10 + i) for i in range(3)]
            digests = (await stub.UploadStream(iter(frames))).digests
            assert [x.crc32 for x in digests] == [f.crc32 for f in frames]
            echoed = [x async for x in stub.EchoStream(iter(frames))]
            assert [x.crc32 for x in echoed] == [f.crc32 for f in frames]
            s = ch.stats()
            assert s["shm_sent"] == 1 + 1 + 3 + 3 and s["shm_received"] == 1 + 1 + 4 + 3, s

    asyncio.run(main())


def test_aio_client_against_a_plain_server(rust_plain_server: Served, blob: Any, blob_grpc: Any) -> None:
    async def main() -> None:
        async with shmgrpc.aio.insecure_channel(rust_plain_server.unix) as ch:
            assert not ch.is_shared_memory()
            assert ch.fallback() == shmgrpc.Fallback.PEER_LACKS_SHMGRPC
            r = await blob_grpc.BlobStub(ch).Echo(payload(blob, MIB, 5))
            assert len(r.data) == MIB
            assert ch.stats()["fallbacks"]["peer_lacks_shmgrpc"] == 1

    asyncio.run(main())


def test_aio_small_calls_take_the_rust_path_and_count_like_the_rest(
    rust_server: Served, blob: Any, blob_grpc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small unary request is encoded and counted by ``Serializer.inline`` and its response by the Rust
    deserializer (the Python encoder is not used: it fails here): the counts match the messages, a large request
    still goes through shared memory, and a request that does not serialize fails when awaited."""

    async def main() -> None:
        async with shmgrpc.aio.insecure_channel(rust_server.unix) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            stub = blob_grpc.BlobStub(ch)
            small = payload(blob, 1024, 7)
            with without_python_encoder(monkeypatch):
                for _ in range(20):
                    assert (await stub.Echo(small)).data == small.data
            big = payload(blob, 4 * MIB, 8)
            assert (await stub.Echo(big)).data == big.data
            s = ch.stats()
            assert s["inline_sent"] == 20 and s["inline_received"] == 20, s
            assert s["shm_sent"] == 1 and s["shm_received"] == 1, s
            assert s["inline_sent_bytes"] == 20 * small.ByteSize(), s
            call = stub.Echo(object())  # not a message: nothing is raised until it is awaited
            with pytest.raises(TypeError, match="SerializeToString"):
                await call
            assert ch.stats()["inline_sent"] == 20, "nothing was counted for it"

    asyncio.run(main())


def test_aio_calls_hold_the_callers_request_until_the_reply_as_grpc_aio_does(
    rust_server: Served, blob: Any, blob_grpc: Any
) -> None:
    """
    A request passed as a temporary stays alive until its call's reply is read, as stock ``grpc.aio`` keeps it:
    freed as soon as it was encoded, a large message's blocks went back to the system while the reply was awaited,
    and the reply's parse paid fresh pages for them (docs/python.md, Benchmark).
    """
    import weakref

    class Request:
        """A message of its own (weak references work on it), encoding as a ``Payload``."""

        def __init__(self, size: int) -> None:
            self.encoded = payload(blob, size, 7).SerializeToString()

    alive: list[bool] = []

    async def main() -> None:
        async with shmgrpc.aio.insecure_channel(rust_server.unix) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            for size in (2 * MIB, 1024):  # through shared memory, and inline
                ref: list[Any] = []

                def parse(data: Any, ref: list[Any] = ref) -> Any:
                    alive.append(ref[0]() is not None)
                    return blob.Payload.FromString(bytes(data))

                echo = ch.unary_unary(
                    "/shmgrpc.demo.v1.Blob/Echo",
                    request_serializer=lambda r: r.encoded,
                    response_deserializer=parse,
                )

                def start(size: int = size, ref: list[Any] = ref, echo: Any = echo) -> Any:
                    request = Request(size)
                    ref.append(weakref.ref(request))
                    return echo(request)  # the caller keeps no reference

                reply = await start()
                assert len(reply.data) == size
                assert ref[0]() is None, "let go of once the call ended"

    asyncio.run(main())
    assert alive == [True, True], "the request lives until its reply is parsed"
