"""A Python client that echoes payloads until killed: ``echo_loop.py TARGET SIZE``. Prints one JSON line once its
first call went through shared memory, then one line per call."""

from __future__ import annotations

import json
import sys

import blob_pb2
import blob_pb2_grpc

import shmgrpc


def main() -> None:
    target, size = sys.argv[1], int(sys.argv[2])
    ch = shmgrpc.insecure_channel(target)
    stub = blob_pb2_grpc.BlobStub(ch)
    kept = []
    i = 0
    while True:
        r = stub.Echo(blob_pb2.Payload(data=bytes([i & 0xFF]) * size))
        kept.append(r)  # keeps nothing of the server's (parsed copies), but grows the pool's use
        kept = kept[-4:]
        print(
            json.dumps({"event": "call", "i": i, "shm": ch.is_shared_memory(), "pid": __import__("os").getpid()}),
            flush=True,
        )
        i += 1


if __name__ == "__main__":
    main()
