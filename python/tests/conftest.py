"""Fixtures: the Rust ``shmgrpc`` binary, generated demo-service stubs, server processes of both languages."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent


def rust_bin() -> str:
    """The ``shmgrpc`` binary: ``$SHMGRPC_BIN`` (set by the cargo test that runs this suite), else built here."""
    path = os.environ.get("SHMGRPC_BIN")
    if path:
        return path
    subprocess.run(["cargo", "build", "-q", "-p", "shmgrpc-cli"], cwd=ROOT, check=True)
    return str(ROOT / "target" / "debug" / "shmgrpc")


@pytest.fixture(scope="session")
def bin_path() -> str:
    return rust_bin()


@pytest.fixture(scope="session")
def stubs_dir() -> Iterator[str]:
    """
    The demo service's ``blob_pb2`` / ``blob_pb2_grpc``, and the protocol's ``shmgrpc_pb2`` (for tests that craft
    references), generated with grpcio-tools (no system protoc).
    """
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as d:
        proto = ROOT / "crates" / "shmgrpc-demo" / "proto"
        rc = protoc.main(["protoc", f"-I{proto}", f"--python_out={d}", f"--grpc_python_out={d}", "blob.proto"])
        assert rc == 0
        proto = ROOT / "crates" / "shmgrpc" / "proto"
        rc = protoc.main(["protoc", f"-I{proto}", f"--python_out={d}", "shmgrpc.proto"])
        assert rc == 0
        sys.path.insert(0, d)
        yield d
        sys.path.remove(d)


@pytest.fixture(scope="session")
def blob(stubs_dir: str) -> Any:
    return importlib.import_module("blob_pb2")


@pytest.fixture(scope="session")
def blob_grpc(stubs_dir: str) -> Any:
    return importlib.import_module("blob_pb2_grpc")


@pytest.fixture(scope="session")
def wire(stubs_dir: str) -> Any:
    """The protocol's messages (``Reference``, ``Part``, ``Region``, ...), for tests that craft references."""
    return importlib.import_module("shmgrpc_pb2")


REFERENCE_FIELD = 19999
"""The field a reference travels in (docs/protocol.md section 6)."""


def encode_reference(wire: Any, session: bytes, parts: list[Any], from_server: bool = False) -> bytes:
    """A reference as a gRPC message: field 19999 holding the ``Reference``."""
    body = wire.Reference(session=session, from_server=from_server, parts=parts).SerializeToString()
    return _varint(REFERENCE_FIELD << 3 | 2) + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass
class Served:
    """A server process; killed on teardown."""

    proc: subprocess.Popen[str]
    unix: str
    ready: dict[str, Any]

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _start(cmd: list[str], unix: str, env: dict[str, str] | None = None) -> Served:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"{cmd[0]} ended before it was ready"
    ready = json.loads(line)
    assert ready["event"] == "ready", line
    return Served(proc, unix, ready)


def _stop(s: Served) -> None:
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGTERM)
        try:
            s.proc.wait(10)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture
def rust_server(bin_path: str, tmp_path: pathlib.Path) -> Iterator[Served]:
    """``shmgrpc serve`` on a Unix socket."""
    unix = f"unix:{tmp_path / 'rust.sock'}"
    s = _start([bin_path, "serve", "--listen", unix], unix)
    yield s
    _stop(s)


@pytest.fixture
def rust_plain_server(bin_path: str, tmp_path: pathlib.Path) -> Iterator[Served]:
    """``shmgrpc serve --plain``: tonic without shmgrpc."""
    unix = f"unix:{tmp_path / 'plain.sock'}"
    s = _start([bin_path, "serve", "--plain", "--listen", unix], unix)
    yield s
    _stop(s)


def start_py_server(stubs_dir: str, unix: str, *extra: str) -> Served:
    """``tests/blob_server.py``: the demo service in Python, in a process of its own."""
    env = {"PYTHONPATH": os.pathsep.join([stubs_dir, str(ROOT / "python" / "src"), os.environ.get("PYTHONPATH", "")])}
    return _start([sys.executable, str(HERE / "blob_server.py"), unix, *extra], unix, env)


@pytest.fixture
def py_server(stubs_dir: str, tmp_path: pathlib.Path) -> Iterator[Served]:
    s = start_py_server(stubs_dir, f"unix:{tmp_path / 'py.sock'}")
    yield s
    _stop(s)


@pytest.fixture
def py_plain_server(stubs_dir: str, tmp_path: pathlib.Path) -> Iterator[Served]:
    s = start_py_server(stubs_dir, f"unix:{tmp_path / 'pyplain.sock'}", "--plain")
    yield s
    _stop(s)


@dataclass
class InProcess:
    """A Python shmgrpc server of the demo service in this process."""

    server: Any
    target: str


@contextlib.contextmanager
def serving(blob_grpc: Any, target: str, **options: Any) -> Iterator[Any]:
    """A Python shmgrpc server of the demo service in this process (``shmgrpc.server(pool, **options)``), serving
    on ``target`` until the block ends."""
    from concurrent import futures

    import shmgrpc

    from .blob_server import Blob

    server = shmgrpc.server(futures.ThreadPoolExecutor(4), **options)
    blob_grpc.add_BlobServicer_to_server(Blob(), server)
    server.add_insecure_port(target)
    server.start()
    try:
        yield server
    finally:
        server.stop(None)


@pytest.fixture
def inproc(blob_grpc: Any, tmp_path: pathlib.Path) -> Iterator[InProcess]:
    target = f"unix:{tmp_path / 'inproc.sock'}"
    with serving(blob_grpc, target) as server:
        yield InProcess(server, target)


def segments_of(bin_path: str, pids: set[int]) -> list[dict[str, Any]]:
    """shmgrpc segments on the machine created by or mapped in ``pids`` (``shmgrpc ls --json``)."""
    out = subprocess.run([bin_path, "ls", "--json"], capture_output=True, text=True, check=True).stdout
    return [s for s in json.loads(out) if s.get("pid") in pids]


@contextlib.contextmanager
def without_python_encoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While the block runs, the Python encoder (``_codec.prepare``) fails: what still works took a Rust path."""

    from shmgrpc import _codec

    def python_path(*args: Any) -> Any:
        raise AssertionError("a message took the Python encoder")

    with monkeypatch.context() as m:
        m.setattr(_codec, "prepare", python_path)
        yield


class Ticker:
    """A Python thread that counts as fast as it can: if ``ticks`` moves while this thread is in a call, the call
    let the GIL go."""

    def __init__(self) -> None:
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, daemon=True)

    def _count(self) -> None:
        while not self._stop.is_set():
            self.ticks += 1


@contextlib.contextmanager
def ticking() -> Iterator[Ticker]:
    """A running :class:`Ticker` (already counting), stopped on exit."""
    t = Ticker()
    t._thread.start()
    time.sleep(0.05)
    try:
        yield t
    finally:
        t._stop.set()
        t._thread.join()


def eventually(what: str, f: Any, timeout: float = 10.0) -> None:
    start = time.monotonic()
    while not f():
        assert time.monotonic() - start < timeout, f"timed out waiting until {what}"
        time.sleep(0.01)
