"""The client the conformance suite checks (``shmgrpc conformance --client``): ``conformance_client.py TARGET
[--aio | --future]`` calls Echo twice with 1 MiB payloads (crc32 set), checks each reply, and exits 0 if both
matched. ``--future`` makes the calls with ``.future()``, whose replies grpcio decodes on the channel's polling
thread (a reply that must wait for its registration is resolved when the caller reads the result)."""

from __future__ import annotations

import asyncio
import os
import sys
import zlib

import blob_pb2
import blob_pb2_grpc

import shmgrpc
import shmgrpc.aio


def request(i: int) -> object:
    data = os.urandom(1 << 20)
    return blob_pb2.Payload(data=data, crc32=zlib.crc32(data), note=f"call {i}")


def sync(target: str) -> bool:
    with shmgrpc.insecure_channel(target) as ch:
        stub = blob_pb2_grpc.BlobStub(ch)
        return all(stub.Echo(r, timeout=30) == r for r in (request(0), request(1)))


def future(target: str) -> bool:
    with shmgrpc.insecure_channel(target) as ch:
        stub = blob_pb2_grpc.BlobStub(ch)
        return all(stub.Echo.future(r, timeout=30).result() == r for r in (request(0), request(1)))


async def aio(target: str) -> bool:
    async with shmgrpc.aio.insecure_channel(target) as ch:
        stub = blob_pb2_grpc.BlobStub(ch)
        ok = True
        for r in (request(0), request(1)):
            ok = ok and await stub.Echo(r, timeout=30) == r
        return ok


def main() -> None:
    target = sys.argv[1]
    if "--aio" in sys.argv:
        ok = asyncio.run(aio(target))
    else:
        ok = future(target) if "--future" in sys.argv else sync(target)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
