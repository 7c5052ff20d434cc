"""Interop with the Rust implementation, both ways: a Python client with ``shmgrpc serve``, ``shmgrpc call`` with a
Python server; every RPC kind, 1 KiB to 256 MiB, and fallback against plain peers both ways."""

from __future__ import annotations

import json
import subprocess
import zlib
from typing import Any

import grpc
import pytest

import shmgrpc
from shmgrpc import Fallback

from .conftest import InProcess, Served, eventually

KIB, MIB = 1024, 1024 * 1024


def payload(blob: Any, size: int, seed: int) -> Any:
    block = bytes((seed * 7 + i) & 0xFF for i in range(256))
    data = (block * (size // 256 + 1))[:size]
    return blob.Payload(data=data, crc32=zlib.crc32(data))


def check(p: Any, size: int) -> None:
    assert len(p.data) == size
    assert zlib.crc32(p.data) == p.crc32, "checksum mismatch"


@pytest.mark.parametrize("size", [1 * KIB, 1 * MIB, 20 * MIB, 256 * MIB])
def test_python_client_echoes_through_shared_memory(rust_server: Served, blob: Any, blob_grpc: Any, size: int) -> None:
    with shmgrpc.insecure_channel(rust_server.unix) as ch:
        assert ch.is_shared_memory(), ch.fallback()
        stub = blob_grpc.BlobStub(ch)
        p = payload(blob, size, 1)
        r = stub.Echo(p)
        check(r, size)
        assert r.crc32 == p.crc32
        s = ch.stats()
        big = size >= 64 * KIB
        assert (s["shm_sent"], s["shm_received"]) == ((1, 1) if big else (0, 0)), s
        assert s["inline_sent"] == (0 if big else 1), s
        if big:
            # The server echoed our own buffer back (a `receiver` part): nothing is held once it was read.
            assert s["shm_received_bytes"] >= size
        assert sum(s["fallbacks"].values()) == 0


def test_python_client_all_rpc_kinds(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    with shmgrpc.insecure_channel(rust_server.unix) as ch:
        stub = blob_grpc.BlobStub(ch)
        size = 2 * MIB
        d = stub.Upload(payload(blob, size, 2))
        assert d.len == size and d.via_shm, "the Rust server saw the upload through shared memory"
        check(stub.Download(blob.DownloadRequest(size=size, seed=3, count=1)), size)
        got = list(stub.DownloadStream(blob.DownloadRequest(size=size, seed=4, count=5)))
        assert len(got) == 5
        for p in got:
            check(p, size)
        frames = [payload(blob, size, 10 + i) for i in range(4)]
        digests = stub.UploadStream(iter(frames)).digests
        assert [(x.len, x.crc32, x.via_shm) for x in digests] == [(size, f.crc32, True) for f in frames]
        echoed = list(stub.EchoStream(iter(frames)))
        assert [e.crc32 for e in echoed] == [f.crc32 for f in frames]
        for e in echoed:
            check(e, size)
        s = ch.stats()
        assert s["shm_sent"] == 1 + 4 + 4 and s["shm_received"] == 1 + 5 + 4, s
        # Metadata, deadlines and statuses are ordinary gRPC.
        with pytest.raises(grpc.RpcError) as e:
            stub.Download(blob.DownloadRequest(size=8 << 30, seed=1, count=1), timeout=10)
        # The server's own status comes through unchanged, message included.
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert "above the limit" in (e.value.details() or ""), e.value
        assert ch.session_figures()["holds"] == 0


def test_python_client_against_a_plain_tonic_server_goes_inline(
    rust_plain_server: Served, blob: Any, blob_grpc: Any
) -> None:
    with shmgrpc.insecure_channel(rust_plain_server.unix) as ch:
        assert not ch.is_shared_memory()
        assert ch.fallback() == Fallback.PEER_LACKS_SHMGRPC
        r = blob_grpc.BlobStub(ch).Echo(payload(blob, MIB, 5))
        check(r, MIB)
        s = ch.stats()
        assert (s["shm_sent"], s["inline_sent"], s["inline_received"]) == (0, 1, 1), s
        assert s["fallbacks"]["peer_lacks_shmgrpc"] == 1


def test_shared_memory_off_is_a_plain_channel(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    with shmgrpc.insecure_channel(rust_server.unix, shared_memory=False) as ch:
        assert not ch.is_shared_memory() and ch.fallback() is None
        check(blob_grpc.BlobStub(ch).Echo(payload(blob, MIB, 6)), MIB)
        assert ch.stats()["shm_sent"] == 0


def test_stock_grpcio_needs_the_authority_option_against_tonic(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    # grpcio sends the percent-encoded socket path as :authority, which h2 rejects; shmgrpc sets localhost.
    opts = [("grpc.default_authority", "localhost"), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(rust_server.unix, options=opts) as ch:
        check(blob_grpc.BlobStub(ch).Echo(payload(blob, MIB, 7)), MIB)


def rust_call(bin_path: str, target: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [bin_path, "call", "--target", target, "--json", *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("op", ["echo", "upload", "download", "download_stream", "upload_stream", "bidi"])
def test_rust_client_with_a_python_server_all_rpc_kinds(bin_path: str, py_server: Served, op: str) -> None:
    lines = rust_call(bin_path, py_server.unix, "--op", op, "--size", "2MiB", "--repeat", "2", "--messages", "4")
    assert lines[0]["shared_memory"] is True, lines[0]
    calls = [x for x in lines if x["event"] == "call"]
    assert len(calls) == 2 and all(c["checksum"] == "ok" for c in calls)
    want_request = "shm" if op in ("echo", "upload", "upload_stream", "bidi") else "inline"
    want_response = "shm" if op in ("echo", "download", "download_stream", "bidi") else "inline"
    assert all((c["request"], c["response"]) == (want_request, want_response) for c in calls), calls


@pytest.mark.parametrize("size", ["1KiB", "1MiB", "20MiB", "256MiB"])
def test_rust_client_with_a_python_server_sizes(bin_path: str, py_server: Served, size: str) -> None:
    lines = rust_call(bin_path, py_server.unix, "--size", size, "--repeat", "1")
    (c,) = [x for x in lines if x["event"] == "call"]
    via = "inline" if size == "1KiB" else "shm"
    assert (c["request"], c["response"], c["checksum"]) == (via, via, "ok"), c


def test_rust_client_against_a_plain_python_server_goes_inline(bin_path: str, py_plain_server: Served) -> None:
    lines = rust_call(bin_path, py_plain_server.unix, "--size", "1MiB", "--repeat", "2")
    assert lines[0]["fallback"] == "peer_lacks_shmgrpc", lines[0]
    calls = [x for x in lines if x["event"] == "call"]
    assert [(c["request"], c["response"]) for c in calls] == [("inline", "inline")] * 2


def test_plain_clients_work_with_a_python_shmgrpc_server(
    bin_path: str, py_server: Served, blob: Any, blob_grpc: Any
) -> None:
    lines = rust_call(bin_path, py_server.unix, "--plain", "--size", "1MiB", "--repeat", "1")
    assert [(c["request"], c["response"]) for c in lines if c["event"] == "call"] == [("inline", "inline")]
    with grpc.insecure_channel(py_server.unix, options=[("grpc.max_receive_message_length", -1)]) as ch:
        check(blob_grpc.BlobStub(ch).Echo(payload(blob, MIB, 8)), MIB)


def test_python_client_and_python_server_in_one_process(blob: Any, blob_grpc: Any, inproc: InProcess) -> None:
    with shmgrpc.insecure_channel(inproc.target) as ch:
        assert ch.is_shared_memory()
        stub = blob_grpc.BlobStub(ch)
        check(stub.Echo(payload(blob, 3 * MIB, 9)), 3 * MIB)
        check(stub.Download(blob.DownloadRequest(size=MIB, seed=1, count=1)), MIB)
        assert inproc.server.stats()["shm_received"] == 1 and inproc.server.stats()["shm_sent"] == 2


def test_loans_send_a_bytes_field_without_a_copy(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    with shmgrpc.insecure_channel(rust_server.unix) as ch:
        stub = blob_grpc.BlobStub(ch)
        size = 8 * MIB
        data = payload(blob, size, 3).data
        loan = ch.loan(size)
        assert loan.shared
        loan.view[:] = data
        r = stub.Echo(shmgrpc.loaned(blob.Payload(crc32=zlib.crc32(data), note="n"), "data", loan))
        check(r, size)
        assert r.note == "n" and r.data == data
        assert ch.stats()["shm_sent"] == 1
        with pytest.raises(ValueError, match="sent once"):
            stub.Echo(shmgrpc.loaned(blob.Payload(), "data", loan))
        with pytest.raises(ValueError, match="unset"):
            shmgrpc.loaned(blob.Payload(data=b"x"), "data", ch.loan(1))
        eventually("the server released the loan", lambda: ch.session_figures()["holds"] == 0)
        assert ch.pool.stats().in_use_bytes == 0
    # Without a session a loan is ordinary memory, and the message goes inline as usual.
    with shmgrpc.insecure_channel(rust_server.unix, shared_memory=False) as plain:
        loan = plain.loan(MIB)
        assert not loan.shared
        loan.view[:] = data[:MIB]
        r = blob_grpc.BlobStub(plain).Echo(shmgrpc.loaned(blob.Payload(crc32=zlib.crc32(data[:MIB])), "data", loan))
        check(r, MIB)


def test_views_read_a_response_field_in_place(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    echo, download = "/shmgrpc.demo.v1.Blob/Echo", "/shmgrpc.demo.v1.Blob/Download"
    with shmgrpc.insecure_channel(rust_server.unix, views={echo: "data", download: "data"}) as ch:
        stub = blob_grpc.BlobStub(ch)
        # From the server's segment (its download is written into a loan of its own).
        with stub.Download(blob.DownloadRequest(size=3 * MIB, seed=4, count=1)) as v:
            assert isinstance(v, shmgrpc.View) and v.shared
            assert len(v.data) == 3 * MIB and zlib.crc32(v.data) == v.message.crc32
            assert not v.message.data, "the field is not copied into the message"
        # Our own buffer echoed back (a `receiver` part): held until the view is released.
        size = 8 * MIB
        data = payload(blob, size, 5).data
        loan = ch.loan(size)
        loan.view[:] = data
        v = stub.Echo(shmgrpc.loaned(blob.Payload(crc32=zlib.crc32(data), note="kept"), "data", loan))
        assert v.shared and v.data == data and v.message.note == "kept"
        assert ch.pool.stats().in_use_bytes > 0, "the echoed buffer is still read"
        v.release()
        v.release()
        eventually("our buffer comes back", lambda: ch.pool.stats().in_use_bytes == 0)
        # Inline replies (below the threshold) give a view of a copy.
        small = stub.Echo(payload(blob, 1024, 6))
        assert not small.shared and len(small.data) == 1024
        # Other methods are untouched.
        assert stub.Upload(payload(blob, MIB, 7)).len == MIB


def test_evicted_buffers_are_forgotten_by_the_peer(blob: Any, blob_grpc: Any, inproc: InProcess) -> None:
    server = inproc.server
    # Room for one 4 MiB buffer: each larger class evicts the idle smaller one.
    with shmgrpc.insecure_channel(inproc.target, budget=4 * MIB) as ch:
        stub = blob_grpc.BlobStub(ch)
        assert stub.Upload(payload(blob, MIB, 1)).len == MIB  # a 2 MiB buffer, registered with the server
        eventually("the server maps it", lambda: server.session_figures()["peer_segments"] == 1)
        eventually("it is released", lambda: ch.pool.stats().in_use_bytes == 0)
        assert stub.Upload(payload(blob, 3 * MIB, 2)).len == 3 * MIB  # evicts it: the server is told
        eventually("the server forgets it", lambda: server.session_figures()["peer_segments"] == 1)
        assert ch.pool.stats().buffers == 1
