"""What the Rust core gives the Python package: the asyncio server, interceptors on both sides, rejected calls
that give their buffers back, arrays that point into shared memory, copies that leave other threads running, and
``fork``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

import shmgrpc
import shmgrpc.aio

from .conftest import (
    ROOT,
    InProcess,
    Served,
    _stop,
    eventually,
    serving,
    start_py_server,
    ticking,
    without_python_encoder,
)

MIB = 1 << 20


def payload(blob: Any, size: int, seed: int = 1) -> Any:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    return blob.Payload(data=data, crc32=zlib.crc32(data))


@pytest.fixture
def aio_server(stubs_dir: str, tmp_path: pathlib.Path) -> Any:
    s = start_py_server(stubs_dir, f"unix:{tmp_path / 'aio.sock'}", "--aio")
    yield s
    _stop(s)


def test_the_asyncio_server_serves_python_and_rust_clients_through_shared_memory(
    aio_server: Served, bin_path: str, blob: Any, blob_grpc: Any
) -> None:
    async def main() -> None:
        async with shmgrpc.aio.insecure_channel(aio_server.unix) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            stub = blob_grpc.BlobStub(ch)
            p = payload(blob, 20 * MIB)
            r = await stub.Echo(p)
            assert r.data == p.data
            assert (await stub.Upload(p)).crc32 == p.crc32
            d = await stub.Download(blob.DownloadRequest(size=3 * MIB, seed=2, count=1))
            assert zlib.crc32(d.data) == d.crc32 and len(d.data) == 3 * MIB
            got = [x async for x in stub.DownloadStream(blob.DownloadRequest(size=MIB, seed=3, count=3))]
            assert [len(x.data) for x in got] == [MIB] * 3
            frames = [payload(blob, 2 * MIB, i) for i in range(3)]
            assert [x.crc32 for x in (await stub.UploadStream(iter(frames))).digests] == [f.crc32 for f in frames]
            assert [x.crc32 async for x in stub.EchoStream(iter(frames))] == [f.crc32 for f in frames]
            s = ch.stats()
            assert s["shm_sent"] == 1 + 1 + 3 + 3 and s["shm_received"] == 1 + 1 + 3 + 3, s

    asyncio.run(main())
    out = subprocess.run(
        [bin_path, "call", "--target", aio_server.unix, "--op", "bidi", "--size", "4MiB", "--repeat", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert '"shared_memory":true' in out.stdout.replace(" ", ""), out.stdout


def test_synchronous_handlers_on_the_asyncio_server_answer_through_shared_memory(
    stubs_dir: str, tmp_path: pathlib.Path, blob: Any, blob_grpc: Any
) -> None:
    """
    grpcio runs a synchronous handler of a ``grpc.aio`` server on a worker thread but serializes its responses on
    the event loop, where no call is entered: the wrapper encodes them on the worker thread instead (before, every
    response of such a handler went inline).
    """
    s = start_py_server(stubs_dir, f"unix:{tmp_path / 'aio-sync.sock'}", "--aio-sync")
    try:
        with shmgrpc.insecure_channel(s.unix) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            stub = blob_grpc.BlobStub(ch)
            p = payload(blob, 20 * MIB)
            assert stub.Echo(p).data == p.data
            assert stub.Upload(p).crc32 == p.crc32
            d = stub.Download(blob.DownloadRequest(size=3 * MIB, seed=2, count=1))
            assert zlib.crc32(d.data) == d.crc32 and len(d.data) == 3 * MIB
            got = list(stub.DownloadStream(blob.DownloadRequest(size=MIB, seed=3, count=3)))
            assert [zlib.crc32(x.data) for x in got] == [x.crc32 for x in got] and len(got) == 3
            frames = [payload(blob, 2 * MIB, i) for i in range(3)]
            assert [x.crc32 for x in stub.UploadStream(iter(frames)).digests] == [f.crc32 for f in frames]
            assert [x.crc32 for x in stub.EchoStream(iter(frames))] == [f.crc32 for f in frames]
            st = ch.stats()
            assert st["shm_sent"] == 1 + 1 + 3 + 3 and st["shm_received"] == 1 + 1 + 3 + 3, st
    finally:
        _stop(s)


class Auth(grpc.ServerInterceptor):
    """Rejects every call without ``authorization: secret``."""

    def __init__(self) -> None:
        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if ("authorization", "secret") in (details.invocation_metadata or ()):
            return continuation(details)
        return self._deny


class Token(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds ``authorization: secret`` to every call."""

    def _add(self, details: Any) -> Any:
        md = [*(details.metadata or ()), ("authorization", "secret")]
        return details._replace(metadata=md) if hasattr(details, "_replace") else _Details(details, md)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._add(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._add(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d: Any, metadata: Any) -> None:
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = d.credentials, d.wait_for_ready, d.compression


def test_an_auth_interceptor_on_the_server_and_intercept_channel_on_the_client_keep_shared_memory(
    blob: Any, blob_grpc: Any, tmp_path: pathlib.Path
) -> None:
    target = f"unix:{tmp_path / 'auth.sock'}"
    with serving(blob_grpc, target, interceptors=[Auth()]):
        with shmgrpc.insecure_channel(target) as ch:
            assert ch.is_shared_memory(), f"discovery passed the interceptor: {ch.fallback()}"
            p = payload(blob, 20 * MIB)
            with pytest.raises(grpc.RpcError) as e:
                blob_grpc.BlobStub(ch).Echo(p)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            intercepted = grpc.intercept_channel(ch, Token())
            stub = blob_grpc.BlobStub(intercepted)
            assert stub.Echo(p).data == p.data
            assert stub.UploadStream(iter([p, p])).digests[1].crc32 == p.crc32
            assert ch.stats()["shm_sent"] >= 3, ch.stats()
            # Rejected uploads are resolved and released by the rejecting handler: nothing stays held. (The Rust
            # unary path, and the Python one of `with_call` and `future`, whose unary scopes stay out of the ledger
            # of open calls.)
            echo = blob_grpc.BlobStub(ch).Echo
            for _ in range(4):
                with pytest.raises(grpc.RpcError):
                    echo(p)
                with pytest.raises(grpc.RpcError):
                    echo.with_call(p)
                with pytest.raises(grpc.RpcError):
                    echo.future(p).result()
            eventually("rejected requests give their buffers back", lambda: ch.session_figures()["holds"] == 0)
            eventually("the pool is idle", lambda: ch.pool.stats().in_use_bytes == 0)


def test_arrays_point_into_the_mapping_and_outlive_their_view(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    download = "/shmgrpc.demo.v1.Blob/Download"
    with shmgrpc.insecure_channel(rust_server.unix, views={download: "data"}) as ch:
        stub = blob_grpc.BlobStub(ch)
        v = stub.Download(blob.DownloadRequest(size=8 * MIB, seed=9, count=1))
        assert isinstance(v, shmgrpc.View) and v.shared
        a = np.frombuffer(v.data, dtype=np.float32)
        piece = v._piece
        assert piece is not None
        assert piece.address <= a.ctypes.data < piece.address + len(piece), "the array is the sender's memory"
        crc = v.message.crc32
        v.release()
        held = ch.session_figures()["peer_segments"]
        assert held >= 1
        assert zlib.crc32(a.tobytes()) == crc, "the array is still valid after its view was released"
        del a, piece, v
        # A 1 GiB float32 array round trip, in place both ways: a loan in, a view out.
    echo = "/shmgrpc.demo.v1.Blob/Echo"
    with shmgrpc.insecure_channel(rust_server.unix, views={echo: "data"}) as ch:
        stub = blob_grpc.BlobStub(ch)
        n = (256 * MIB) // 4
        loan = ch.loan(n * 4)
        arr = np.ndarray((n,), np.float32, buffer=loan)  # type: ignore[arg-type]  # numpy's stubs: a buffer from Python 3.12
        arr[:] = 1.5
        assert arr.ctypes.data == loan.address
        del arr
        v = stub.Echo(shmgrpc.loaned(blob.Payload(), "data", loan))
        out = np.frombuffer(v.data, dtype=np.float32)
        assert out.shape == (n,) and float(out[0]) == 1.5 and float(out[-1]) == 1.5
        assert out.ctypes.data == loan.address, "the echo is our own buffer, sent back"
        del out
        v.release()
        eventually("our buffer comes back", lambda: ch.pool.stats().in_use_bytes == 0)


def test_copies_into_shared_memory_leave_other_threads_running(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    """A 256 MiB message's copies run without the GIL: a Python thread counts on meanwhile."""
    with shmgrpc.insecure_channel(rust_server.unix) as ch:
        stub = blob_grpc.BlobStub(ch)
        data = bytes(256 * MIB)
        big = blob.Payload(data=data, crc32=zlib.crc32(data))
        stub.Upload(big)  # warm: the pool's buffer exists
        with ticking() as t:
            before = t.ticks
            for _ in range(3):
                assert stub.Upload(big).len == 256 * MIB  # each copies 256 MiB into shared memory
            during = t.ticks - before
        assert ch.stats()["shm_sent"] == 4
        assert during > 0, "the other thread ran while the payloads were copied"


def test_a_large_write_into_a_loan_leaves_other_threads_running(rust_server: Served, blob: Any, blob_grpc: Any) -> None:
    """``Loan.write`` copies without the GIL (split across threads when cores are free), and what it wrote is what
    the server gets."""
    with shmgrpc.insecure_channel(rust_server.unix) as ch:
        stub = blob_grpc.BlobStub(ch)
        data = os.urandom(64 * MIB)
        during = 0
        with ticking() as t:
            for _ in range(3):
                loan = ch.loan(len(data))
                before = t.ticks
                assert loan.write(data) == len(data)
                during += t.ticks - before
                reply = stub.Upload(shmgrpc.loaned(blob.Payload(crc32=zlib.crc32(data)), "data", loan))
                assert reply.len == len(data) and reply.crc32 == zlib.crc32(data)
        assert during > 0, "the other thread ran while the loans were written"


@contextlib.asynccontextmanager
async def aio_blob_server(blob_grpc: Any, target: str) -> AsyncIterator[tuple[Any, Any]]:
    """An in-process ``shmgrpc.aio.server`` of the Blob service (``blob_server.AioBlob``) on ``target``, and an
    asyncio channel to it with its session open; both stopped afterwards."""
    from .blob_server import AioBlob

    server = shmgrpc.aio.server()
    blob_grpc.add_BlobServicer_to_server(AioBlob(), server)
    server.add_insecure_port(target)
    await server.start()
    try:
        async with shmgrpc.aio.insecure_channel(target) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            yield server, ch
    finally:
        await server.stop(None)


def test_the_asyncio_server_answers_small_unary_calls_on_its_rust_path(
    blob: Any, blob_grpc: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small unary responses of async handlers are encoded, counted and numbered by ``Serializer.inline`` (the
    Python encoder is not used: it fails here); a large response still goes through shared memory."""

    async def main() -> None:
        async with aio_blob_server(blob_grpc, f"unix:{tmp_path / 'aio-fast.sock'}") as (server, ch):
            stub = blob_grpc.BlobStub(ch)
            small = payload(blob, 1024)
            with without_python_encoder(monkeypatch):
                for _ in range(10):
                    assert (await stub.Echo(small)).data == small.data
            stats = server.stats()
            assert stats["inline_sent"] == 10 and stats["inline_received"] == 10, stats
            big = payload(blob, 4 * MIB)
            assert (await stub.Echo(big)).data == big.data
            stats = server.stats()
            assert stats["shm_sent"] == 1 and stats["inline_sent"] == 10, stats

    asyncio.run(main())


def test_the_asyncio_client_and_server_read_a_large_field_once(
    blob: Any, blob_grpc: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Reading a ``bytes`` field of a upb message copies it. ``Serializer.inline`` reads each field to find the large
    ones; the asyncio client (for a large request) and server (for a large response) send those values as read,
    instead of reading the field again in ``_codec._split``: one copy and one fresh 20 MiB block fewer per message,
    on the event loop.
    """
    from shmgrpc import _codec

    split = _codec._split
    given: list[tuple[str, ...] | None] = []

    def spy(message: Any, serialize: Any, read: dict[str, Any] | None = None) -> list[Any] | None:
        given.append(None if read is None else tuple(read))
        return split(message, serialize, read)

    monkeypatch.setattr(_codec, "_split", spy)

    async def main() -> None:
        async with aio_blob_server(blob_grpc, f"unix:{tmp_path / 'aio-once.sock'}") as (server, ch):
            big = payload(blob, 4 * MIB)
            assert (await blob_grpc.BlobStub(ch).Echo(big)).data == big.data
            assert ch.stats()["shm_sent"] == 1 and server.stats()["shm_sent"] == 1

    asyncio.run(main())
    # The request on the client, the response on the server: each split from the values read once.
    assert given == [("data",), ("data",)], given


FORK_CHILD = """
import os, sys, zlib
sys.path[:0] = {paths!r}
import blob_pb2, blob_pb2_grpc, shmgrpc
ch = shmgrpc.insecure_channel({target!r})
stub = blob_pb2_grpc.BlobStub(ch)
d = os.urandom(2 << 20)
assert stub.Echo(blob_pb2.Payload(data=d, crc32=zlib.crc32(d))).data == d
pid = os.fork()
if pid == 0:
    # The child has no share of the parent's session: it opens its own (or goes inline) and is served.
    ok = stub.Echo(blob_pb2.Payload(data=d, crc32=zlib.crc32(d))).data == d
    child = shmgrpc.insecure_channel({target!r})
    ok = ok and blob_pb2_grpc.BlobStub(child).Echo(blob_pb2.Payload(data=d)).data == d
    ok = ok and child.is_shared_memory()
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
# The parent's session is untouched by the child.
assert ch.is_shared_memory()
assert stub.Echo(blob_pb2.Payload(data=d, crc32=zlib.crc32(d))).data == d
print("ok", ch.stats()["shm_sent"])
"""


def test_a_forked_child_gets_no_share_of_the_parents_session(rust_server: Served, stubs_dir: str) -> None:
    code = FORK_CHILD.format(paths=[stubs_dir, str(ROOT / "python" / "src")], target=rust_server.unix)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok"), out.stdout


def test_a_server_reads_requests_in_place_and_echoes_them_without_a_copy(
    stubs_dir: str, bin_path: str, tmp_path: pathlib.Path, blob: Any, blob_grpc: Any
) -> None:
    s = start_py_server(stubs_dir, f"unix:{tmp_path / 'views.sock'}", "--views")
    try:
        echo = "/shmgrpc.demo.v1.Blob/Echo"
        with shmgrpc.insecure_channel(s.unix, views={echo: "data"}) as ch:
            stub = blob_grpc.BlobStub(ch)
            loan = ch.loan(20 * MIB)
            np.ndarray((20 * MIB,), np.uint8, buffer=loan)[:] = 7  # type: ignore[arg-type]  # numpy's stubs: a buffer from Python 3.12
            v = stub.Echo(shmgrpc.loaned(blob.Payload(crc32=1, note="n"), "data", loan))
            assert v.shared and v.message.note == "n" and len(v.data) == 20 * MIB and v.data[-1] == 7
            piece = v._piece
            assert piece is not None and piece.address == loan.address, "the server sent our own buffer back"
            v.release()
            del piece, v
            eventually("every hold is given back", lambda: ch.session_figures()["holds"] == 0)
            d = payload(blob, 3 * MIB)
            assert stub.Upload(d).crc32 == d.crc32, "the server read the request in place"
            assert ch.stats()["shm_sent"] == 2 and ch.stats()["shm_received"] == 1
        out = subprocess.run(
            [bin_path, "call", "--target", s.unix, "--size", "8MiB", "--repeat", "2", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and '"checksum":"ok"' in out.stdout.replace(" ", ""), out.stdout + out.stderr
    finally:
        _stop(s)


def test_gzip_compresses_the_reference_not_the_payload_in_shared_memory(
    inproc: InProcess, blob: Any, blob_grpc: Any
) -> None:
    # (The demo's tonic server accepts no compressed requests: tonic needs `accept_compressed` for that.)
    with shmgrpc.insecure_channel(inproc.target, compression=grpc.Compression.Gzip) as ch:
        stub = blob_grpc.BlobStub(ch)
        p = payload(blob, 4 * MIB)
        assert stub.Echo(p).data == p.data
        s = ch.stats()
        assert s["shm_sent"] == 1 and s["shm_received"] == 1, s
        small = payload(blob, 1024)
        assert stub.Echo(small).data == small.data, "inline messages are compressed as usual"


def slow_upload_stream_server(tmp_path: pathlib.Path, blob: Any, blob_grpc: Any) -> tuple[Any, str]:
    """A Python server whose UploadStream stops reading after the request with note "stop"."""
    from .blob_server import Blob

    class Stopping(Blob):
        def UploadStream(self, requests: Any, context: Any) -> Any:
            digests = []
            for p in requests:
                digests.append(blob.Digest(len=len(p.data), crc32=zlib.crc32(p.data)))
                if p.note == "stop":
                    break
            return blob.DigestList(digests=digests)

    server = shmgrpc.server(futures.ThreadPoolExecutor(4))
    blob_grpc.add_BlobServicer_to_server(Stopping(), server)
    target = f"unix:{tmp_path / 'stopping.sock'}"
    server.add_insecure_port(target)
    server.start()
    return server, target


@pytest.mark.parametrize("version", [4, 3])
def test_streams_read_only_in_part_give_every_buffer_back_at_once(
    tmp_path: pathlib.Path, blob: Any, blob_grpc: Any, rust_server: Served, monkeypatch: Any, version: int
) -> None:
    """
    Protocol version 3 and later (`CallEnd`): a request stream the server stops reading, and a response stream the
    client stops reading, give back the holds of the messages sent and never read, at once (not when the session
    ends). A version 3 client numbers its calls in a header of their own, a version 4 client in the session's.
    """
    monkeypatch.setattr(shmgrpc.client, "PROTOCOL_VERSION", version)
    server, target = slow_upload_stream_server(tmp_path, blob, blob_grpc)
    try:
        with shmgrpc.insecure_channel(target) as ch:
            assert ch._session is not None and ch._session.version == version
            stub = blob_grpc.BlobStub(ch)
            for _ in range(5):
                frames = [payload(blob, 4 * MIB, i) for i in range(8)]
                frames[1].note = "stop"
                assert len(stub.UploadStream(iter(frames)).digests) == 2
            # The client's requests the server never read: released by its CallEnd, not kept till the session ends.
            eventually("the unread requests' holds come back", lambda: ch.session_figures()["holds"] == 0)
            eventually("the client's pool is idle", lambda: ch.pool.stats().in_use_bytes == 0)
            # Response streams the client drops after two messages: the server's holds of the rest come back.
            for i in range(5):
                responses = stub.DownloadStream(blob.DownloadRequest(size=4 * MIB, seed=i, count=8))
                assert len(next(responses).data) == 4 * MIB
                assert len(next(responses).data) == 4 * MIB
                responses.cancel()
                del responses
            eventually("the server's unread replies are given back", lambda: server.session_figures()["holds"] == 0)
            assert ch.is_shared_memory()
    finally:
        server.stop(None)
    # Against the Rust server too: its replies the Python client never read come back (the session stays usable).
    with shmgrpc.insecure_channel(rust_server.unix) as ch:
        assert ch._session is not None and ch._session.version == version
        stub = blob_grpc.BlobStub(ch)
        for i in range(5):
            responses = stub.DownloadStream(blob.DownloadRequest(size=4 * MIB, seed=i, count=8))
            next(responses)
            responses.cancel()
        d = payload(blob, 2 * MIB)
        assert stub.Echo(d).data == d.data
        assert ch.stats()["shm_sent"] >= 1


def test_small_unary_calls_leave_the_header_off_once_learned_and_large_messages_bring_it_back(
    blob: Any, blob_grpc: Any, tmp_path: pathlib.Path
) -> None:
    # Which calls the server saw in a session, and the metadata the application sent.
    seen: list[tuple[str, bool, str | None]] = []

    from .blob_server import Blob

    class Recording(Blob):
        def Echo(self, request: Any, context: Any) -> Any:
            seen.append(("echo", shmgrpc._core.current()[0] is not None, dict(context.invocation_metadata()).get("k")))
            return request

        def Download(self, request: Any, context: Any) -> Any:
            seen.append(("download", shmgrpc._core.current()[0] is not None, None))
            return super().Download(request, context)

    target = f"unix:{tmp_path / 'learn.sock'}"
    server = shmgrpc.server(futures.ThreadPoolExecutor(2))
    blob_grpc.add_BlobServicer_to_server(Recording(), server)
    server.add_insecure_port(target)
    server.start()
    learning = shmgrpc._core.LEARNING_CALLS
    try:
        with shmgrpc.insecure_channel(target) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            stub = blob_grpc.BlobStub(ch)
            small = blob.Payload(data=b"x" * 1024, crc32=1)
            for i in range(learning + 8):
                # Metadata and a timeout pass through on both paths (by keyword: the Rust wrapper's fast path).
                assert stub.Echo(small, metadata=(("k", str(i)),), timeout=10).data == small.data
            assert [s for _, s, _ in seen] == [True] * learning + [False] * 8, "the learning calls carry the header"
            assert [k for _, _, k in seen] == [str(i) for i in range(learning + 8)]
            # A request its serializer refuses fails the call as with stock grpcio, and says nothing of sizes.
            with pytest.raises(grpc.RpcError) as e:
                stub.Echo(object())
            assert e.value.code() == grpc.StatusCode.INTERNAL
            seen.clear()
            assert stub.Echo(small).data == small.data
            assert seen == [("echo", False, None)], "still without the header"
            # A large request goes through shared memory (the header is back), and so does every later call.
            seen.clear()
            before = ch.stats()
            big = payload(blob, 2 * MIB)
            assert stub.Echo(big).data == big.data
            assert stub.Echo(small).data == small.data
            after = ch.stats()
            assert after["shm_sent"] == before["shm_sent"] + 1, (before, after)
            assert after["shm_received"] == before["shm_received"] + 1, (before, after)
            assert [s for _, s, _ in seen] == [True, True]

            # A method with small responses only, until a large one: that one comes inline (the server had no
            # session for the call), and the next comes through shared memory.
            seen.clear()
            for _ in range(learning + 4):
                assert len(stub.Download(blob.DownloadRequest(size=100, seed=1, count=1)).data) == 100
            assert [s for _, s, _ in seen] == [True] * learning + [False] * 4
            before = ch.stats()
            for _ in range(2):
                d = stub.Download(blob.DownloadRequest(size=2 * MIB, seed=3, count=1))
                assert len(d.data) == 2 * MIB and zlib.crc32(d.data) == d.crc32
            after = ch.stats()
            assert seen[-2:] == [("download", False, None), ("download", True, None)]
            assert after["inline_received"] == before["inline_received"] + 1, (before, after)
            assert after["shm_received"] == before["shm_received"] + 1, (before, after)
            assert sum(after["fallbacks"].values()) == sum(before["fallbacks"].values())

        async def aio() -> None:
            async with shmgrpc.aio.insecure_channel(target) as ch:
                assert ch.is_shared_memory(), ch.fallback()
                stub = blob_grpc.BlobStub(ch)
                for i in range(learning + 4):
                    assert (await stub.Echo(small, metadata=(("k", str(i)),))).data == small.data
                with pytest.raises(Exception):  # noqa: B017 (grpc.aio fails it as it fails any bad request)
                    await stub.Echo(object())
                assert (await stub.Echo(small)).data == small.data  # still without the header
                big = payload(blob, 2 * MIB)
                before = ch.stats()
                assert (await stub.Echo(big)).data == big.data
                assert (await stub.Echo(small)).data == small.data
                assert ch.stats()["shm_sent"] == before["shm_sent"] + 1

        seen.clear()
        asyncio.run(aio())
        # The refused request reached no server, and left the method without the header.
        assert [s for _, s, _ in seen] == [True] * learning + [False] * 5 + [True, True], "asyncio: the same"
        assert [k for _, _, k in seen[: learning + 4]] == [str(i) for i in range(learning + 4)]
    finally:
        server.stop(None)


def test_a_server_with_a_lower_threshold_than_the_clients_still_gets_its_responses_through_shared_memory(
    blob: Any, blob_grpc: Any, tmp_path: pathlib.Path
) -> None:
    # The client judges a method's responses by the smaller threshold, its own or the one the server's `Welcome`
    # named: a response between the two would come through the server's shared memory, so the header comes back.
    from .blob_server import Blob

    target = f"unix:{tmp_path / 'low.sock'}"
    server = shmgrpc.server(futures.ThreadPoolExecutor(2), threshold=16 * 1024)
    blob_grpc.add_BlobServicer_to_server(Blob(), server)
    server.add_insecure_port(target)
    server.start()
    learning = shmgrpc._core.LEARNING_CALLS
    between = 32 * 1024
    assert 16 * 1024 < between < shmgrpc._core.DEFAULT_THRESHOLD  # the client's
    small = blob.DownloadRequest(size=100, seed=1, count=1)
    medium = blob.DownloadRequest(size=between, seed=3, count=1)
    try:
        with shmgrpc.insecure_channel(target) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            stub = blob_grpc.BlobStub(ch)
            for _ in range(learning + 2):
                assert len(stub.Download(small).data) == 100
            before = ch.stats()
            for _ in range(3):
                d = stub.Download(medium)
                assert len(d.data) == between and zlib.crc32(d.data) == d.crc32
            after = ch.stats()
            # The first came inline (the call had no header); the others through shared memory.
            assert after["inline_received"] == before["inline_received"] + 1, (before, after)
            assert after["shm_received"] == before["shm_received"] + 2, (before, after)

        async def aio() -> None:
            async with shmgrpc.aio.insecure_channel(target) as ch:
                assert ch.is_shared_memory(), ch.fallback()
                stub = blob_grpc.BlobStub(ch)
                for _ in range(learning + 2):
                    assert len((await stub.Download(small)).data) == 100
                before = ch.stats()
                for _ in range(3):
                    d = await stub.Download(medium)
                    assert len(d.data) == between and zlib.crc32(d.data) == d.crc32
                after = ch.stats()
                assert after["inline_received"] == before["inline_received"] + 1, (before, after)
                assert after["shm_received"] == before["shm_received"] + 2, (before, after)

        asyncio.run(aio())
    finally:
        server.stop(None)
