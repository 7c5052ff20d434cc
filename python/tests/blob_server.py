"""The demo blob service in Python (for the interop tests and bench.py): ``blob_server.py ADDRESS [--plain] [--aio |
--aio-sync] [--views]``.

Prints one JSON readiness line on stdout, like ``shmgrpc serve``; stops on SIGTERM. ``--aio`` serves it with
``shmgrpc.aio.server`` (async handlers), ``--aio-sync`` the synchronous handlers on ``shmgrpc.aio.server`` (which
grpcio runs on worker threads); ``--views`` reads the payload of Echo and Upload requests in place (a
``shmgrpc.View``) and echoes it back without a copy.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import zlib
from concurrent import futures
from typing import Any

import blob_pb2
import blob_pb2_grpc
import grpc

import shmgrpc
import shmgrpc.aio


def pattern(size: int, seed: int) -> bytes:
    block = bytes((seed + i) & 0xFF for i in range(256))
    return (block * (size // 256 + 1))[:size]


def payload(size: int, seed: int) -> Any:
    d = pattern(size, seed)
    return blob_pb2.Payload(data=d, crc32=zlib.crc32(d))


class Blob(blob_pb2_grpc.BlobServicer):
    def Echo(self, request: Any, context: Any) -> Any:
        return request

    def Upload(self, request: Any, context: Any) -> Any:
        return blob_pb2.Digest(len=len(request.data), crc32=zlib.crc32(request.data))

    def Download(self, request: Any, context: Any) -> Any:
        # Written in place into a loan: through a session the reply goes out without a copy.
        data = pattern(request.size, request.seed)
        loan = shmgrpc.loan(request.size)
        loan.view[:] = data
        return shmgrpc.loaned(blob_pb2.Payload(crc32=zlib.crc32(data)), "data", loan)

    def DownloadStream(self, request: Any, context: Any) -> Any:
        for i in range(request.count):
            yield payload(request.size, request.seed + i)

    def UploadStream(self, requests: Any, context: Any) -> Any:
        return blob_pb2.DigestList(
            digests=[blob_pb2.Digest(len=len(p.data), crc32=zlib.crc32(p.data)) for p in requests]
        )

    def EchoStream(self, requests: Any, context: Any) -> Any:
        yield from requests


ECHO, UPLOAD = "/shmgrpc.demo.v1.Blob/Echo", "/shmgrpc.demo.v1.Blob/Upload"


class ViewBlob(Blob):
    """Echo and Upload get a ``shmgrpc.View`` of the request's payload: read, and echoed, in place."""

    def Echo(self, request: Any, context: Any) -> Any:
        return shmgrpc.loaned(request.message, "data", request)

    def Upload(self, request: Any, context: Any) -> Any:
        with request:
            return blob_pb2.Digest(len=len(request.data), crc32=zlib.crc32(request.data))


class AioBlob(blob_pb2_grpc.BlobServicer):
    """The same service with async handlers."""

    async def Echo(self, request: Any, context: Any) -> Any:
        return request

    async def Upload(self, request: Any, context: Any) -> Any:
        return blob_pb2.Digest(len=len(request.data), crc32=zlib.crc32(request.data))

    async def Download(self, request: Any, context: Any) -> Any:
        data = pattern(request.size, request.seed)
        loan = shmgrpc.loan(request.size)
        loan.view[:] = data
        return shmgrpc.loaned(blob_pb2.Payload(crc32=zlib.crc32(data)), "data", loan)

    async def DownloadStream(self, request: Any, context: Any) -> Any:
        for i in range(request.count):
            yield payload(request.size, request.seed + i)

    async def UploadStream(self, requests: Any, context: Any) -> Any:
        digests = [blob_pb2.Digest(len=len(p.data), crc32=zlib.crc32(p.data)) async for p in requests]
        return blob_pb2.DigestList(digests=digests)

    async def EchoStream(self, requests: Any, context: Any) -> Any:
        async for r in requests:
            yield r


async def serve_aio(address: str, sync: bool) -> None:
    server = shmgrpc.aio.server()
    blob_pb2_grpc.add_BlobServicer_to_server(Blob() if sync else AioBlob(), server)
    server.add_insecure_port(address)
    await server.start()
    ready = {"event": "ready", "listen": [address], "side_channel": server.side_channel_path, "shared_memory": True}
    print(json.dumps(ready), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(None)


def main() -> None:
    address = sys.argv[1]
    if "--aio" in sys.argv or "--aio-sync" in sys.argv:
        asyncio.run(serve_aio(address, "--aio-sync" in sys.argv))
        return
    plain = "--plain" in sys.argv
    pool = futures.ThreadPoolExecutor(8)
    big = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    views = "--views" in sys.argv
    server: Any = (
        grpc.server(pool, options=big)
        if plain
        else shmgrpc.server(pool, views={ECHO: "data", UPLOAD: "data"} if views else None)
    )
    blob_pb2_grpc.add_BlobServicer_to_server(ViewBlob() if views else Blob(), server)
    server.add_insecure_port(address)
    server.start()
    side = None if plain else server.side_channel_path
    print(
        json.dumps({"event": "ready", "listen": [address], "side_channel": side, "shared_memory": not plain}),
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: server.stop(None))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
