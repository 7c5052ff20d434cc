"""``kill -9`` of either side leaves nothing behind: no segment of the dead process in ``shmgrpc ls``, the other
side's session ends, and what the dead peer held comes back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from typing import Any

import shmgrpc

from .conftest import ROOT, InProcess, Served, _stop, eventually, segments_of, start_py_server

HERE = os.path.dirname(__file__)


def start_loop(stubs_dir: str, target: str, size: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([stubs_dir, str(ROOT / "python" / "src")])}
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "echo_loop.py"), target, str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def wait_calls(p: subprocess.Popen[str], n: int) -> None:
    assert p.stdout is not None
    for _ in range(n):
        line = p.stdout.readline()
        assert line, "the client ended"
        assert json.loads(line)["shm"] is True


def test_kill9_of_a_python_client_leaves_nothing(
    bin_path: str, stubs_dir: str, blob: Any, blob_grpc: Any, inproc: InProcess
) -> None:
    server, target = inproc.server, inproc.target
    p = start_loop(stubs_dir, target, 3 << 20)
    wait_calls(p, 5)
    assert server.sessions() == 1
    p.kill()
    p.wait()
    eventually("the server's session ends", lambda: server.sessions() == 0)
    eventually("the server's buffers come back", lambda: server.pool.stats().in_use_bytes == 0)
    assert server.session_figures() == {"holds": 0, "peer_segments": 0}
    assert segments_of(bin_path, {p.pid}) == []
    # Another client is served at once, through shared memory.
    with shmgrpc.insecure_channel(target) as ch:
        d = os.urandom(1 << 20)
        assert blob_grpc.BlobStub(ch).Echo(blob.Payload(data=d, crc32=zlib.crc32(d))).data == d
        assert ch.stats()["shm_sent"] == 1


def test_kill9_of_a_python_client_with_the_rust_server(
    bin_path: str, stubs_dir: str, rust_server: Served, blob: Any, blob_grpc: Any
) -> None:
    p = start_loop(stubs_dir, rust_server.unix, 3 << 20)
    wait_calls(p, 5)
    p.kill()
    p.wait()
    assert segments_of(bin_path, {p.pid}) == []
    with shmgrpc.insecure_channel(rust_server.unix) as ch:
        d = os.urandom(1 << 20)
        assert blob_grpc.BlobStub(ch).Echo(blob.Payload(data=d, crc32=zlib.crc32(d))).data == d
        assert ch.stats()["shm_received"] == 1


def test_kill9_of_the_rust_server_ends_the_python_session(
    bin_path: str, rust_server: Served, blob: Any, blob_grpc: Any
) -> None:
    ch = shmgrpc.insecure_channel(rust_server.unix)
    stub = blob_grpc.BlobStub(ch)
    kept = [stub.Download(blob.DownloadRequest(size=2 << 20, seed=i, count=1)) for i in range(3)]
    up = b"u" * (2 << 20)
    stub.Upload(blob.Payload(data=up, crc32=zlib.crc32(up)))
    assert ch.is_shared_memory() and ch.session_figures()["peer_segments"] >= 1
    rust_server.kill9()
    eventually("the session ends", lambda: not ch.is_shared_memory())
    assert ch.fallback() == shmgrpc.Fallback.SESSION_CLOSED
    assert ch.session_figures()["holds"] == 0 and ch.pool.stats().in_use_bytes == 0
    assert ch.session_figures()["peer_segments"] == 0
    assert segments_of(bin_path, {rust_server.proc.pid}) == []
    assert all(len(k.data) == 2 << 20 for k in kept), "parsed replies are ours"
    ch.close()


def test_kill9_of_a_python_server_under_a_rust_client(bin_path: str, stubs_dir: str, tmp_path: Any) -> None:
    unix = f"unix:{tmp_path / 'pk.sock'}"
    srv = start_py_server(stubs_dir, unix)
    client = subprocess.Popen(
        [bin_path, "call", "--target", unix, "--size", "2MiB", "--repeat", "1000000", "--keep", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert client.stdout is not None
    for _ in range(6):
        line = json.loads(client.stdout.readline())
        assert line.get("shared_memory", True) is True and line.get("response", "shm") == "shm", line
    srv.kill9()
    client.wait(30)
    assert client.returncode != 0, "the client noticed the server is gone"
    assert segments_of(bin_path, {srv.proc.pid, client.pid}) == []


HOLDER = """
import sys, time
sys.path[:0] = {paths!r}
import blob_pb2, blob_pb2_grpc, shmgrpc
ch = shmgrpc.insecure_channel({target!r}, views={{"/shmgrpc.demo.v1.Blob/Download": "data"}})
stub = blob_pb2_grpc.BlobStub(ch)
kept = [stub.Download(blob_pb2.DownloadRequest(size=24 << 20, seed=i, count=1)) for i in range(3)]
assert all(v.shared for v in kept)
print("held", flush=True)
time.sleep(600)
"""


def test_kill9_of_a_python_client_gives_the_rust_server_its_buffers_back(
    bin_path: str, stubs_dir: str, tmp_path: Any, blob: Any, blob_grpc: Any
) -> None:
    """
    A Python client holds three 24 MiB replies of a Rust server whose pool has 128 MiB (each reply takes a 32 MiB
    buffer: 96 MiB held), and is killed. The server takes them back at once: a 40 MiB reply (a 64 MiB buffer) to
    another client goes through shared memory, which it could not while they were held.
    """
    from .conftest import _start

    unix = f"unix:{tmp_path / 'budget.sock'}"
    srv = _start([bin_path, "serve", "--listen", unix, "--pool-budget", "128MiB"], unix)
    try:
        code = HOLDER.format(paths=[stubs_dir, str(ROOT / "python" / "src")], target=unix)
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        download = "/shmgrpc.demo.v1.Blob/Download"
        with shmgrpc.insecure_channel(unix, views={download: "data"}) as ch:
            stub = blob_grpc.BlobStub(ch)
            with stub.Download(blob.DownloadRequest(size=40 << 20, seed=1, count=1)) as v:
                assert not v.shared, "while the buffers are held, the server's pool has no room: inline"
            holder.kill()
            holder.wait()

            def shared_again() -> bool:
                with stub.Download(blob.DownloadRequest(size=40 << 20, seed=2, count=1)) as v:
                    return v.shared and zlib.crc32(v.data) == v.message.crc32

            eventually("the dead client's buffers are back in the server's pool", shared_again)
    finally:
        _stop(srv)
