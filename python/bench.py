"""Benchmark of the Python package against stock grpcio, side by side in one run, on Unix sockets.

    python bench.py [--bin target/release/shmgrpc] [--sizes 1KiB,1MiB,20MiB,100MiB] [--array 1GiB]
                    [--json ../docs/python-bench.json]

Five parts, every reply checked outside the timed region, lanes interleaved: each size in rounds (of at most 100
calls per lane, at least 4 rounds; ``--blocks N`` for N rounds), every lane a block of calls per round in an order
shuffled per round, so that drifts and bursts of a shared machine's noise hit all alike. In the echo parts every
lane makes its request from the same ``bytes`` payload inside the timed call (a message with the field set, or the
payload copied into a loan with ``Loan.write``):

- ``rust``: a Python client against ``shmgrpc serve`` (Rust). Lanes: stock grpcio; shmgrpc with ordinary messages
  (the converted service: nothing else changed); with the request payload written into a loan
  (``shmgrpc.loaned``); and with the reply read in place too (``views=``, a ``shmgrpc.View``). Below the
  threshold also ``grpcio+headers``: stock grpcio sending a session's headers to the shmgrpc server, what the
  headers cost without shmgrpc's client code.
- ``python``: Python client and Python server (``tests/blob_server.py``). Stock grpcio against a stock grpcio
  server; shmgrpc against the converted server; with loans and views on both sides (``--views``: the server reads
  the request in place and echoes it without a copy).
- ``array``: a float32 numpy array round trip (echo) of ``--array`` bytes, Python to Python: stock grpcio
  (``tobytes`` in, ``frombuffer`` out) against shmgrpc with the array made in a loan and the reply read as an array
  over the view (no copy). The producer's filling of the array is not timed in either lane.
- ``aio``: asyncio clients against ``shmgrpc serve``: stock ``grpc.aio`` and ``shmgrpc.aio`` (code unchanged);
  below the threshold also ``grpc.aio+headers`` (stock ``grpc.aio`` sending a session's headers).
- ``latency``: p50/p99 of 1 KiB echoes on one channel while another thread of the same process echoes 256 MiB
  messages on another channel (transparent path), against the same without the large echoes.

Below the threshold the loan lanes run in rounds of their own, each round with its own stock lane
(``grpcio_in_loan_rounds`` in the JSON; their ratios are to it): a loan's release crosses the side channel after
the call, work for both processes' I/O threads that would land on the lane run next. Measured Python to Python at
1 KiB, the transparent lane's paired ratio was 0.90-0.96 with the loan lanes in its rounds, 0.97-0.99 without.

Medians and percentiles in milliseconds, and the ratios stock / shmgrpc, go to stdout and to ``--json``: the ratio
of the lanes' medians (``speedup <lane>``), and the paired ratio (``paired_speedup``: per round the stock lane's
median over the lane's, the median over the rounds, which follows the machine's drifts better). The JSON
also has each echo lane's median minor page faults per call (``faults_median``, the whole process's: every fresh
4 KiB page a call touches is one, and large messages' cost depends much on them, see docs/python.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pathlib
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import numpy as np

import shmgrpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent
UNITS = {"KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}
ECHO = "/shmgrpc.demo.v1.Blob/Echo"
BIG = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def parse_size(s: str) -> int:
    for unit, n in UNITS.items():
        if s.endswith(unit):
            return int(s[: -len(unit)]) * n
    return int(s)


def stubs(tmp: str) -> tuple[Any, Any]:
    from grpc_tools import protoc

    proto = ROOT / "crates" / "shmgrpc-demo" / "proto"
    assert protoc.main(["protoc", f"-I{proto}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", "blob.proto"]) == 0
    sys.path.insert(0, tmp)
    import blob_pb2
    import blob_pb2_grpc

    return blob_pb2, blob_pb2_grpc


def iterations(size: int) -> int:
    if size <= 64 << 10:
        return 2000
    if size <= 4 << 20:
        return 300
    if size <= 32 << 20:
        return 40
    if size <= 128 << 20:
        return 8
    return 4


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def summary(ts: list[float], faults: list[int] | None = None) -> dict[str, float]:
    """Median and percentiles of ``ts`` (seconds) in ms; with ``faults``, the median page faults per call."""
    ms = [t * 1e3 for t in ts]
    out = {"median_ms": statistics.median(ms), "p90_ms": pct(ms, 0.9), "p99_ms": pct(ms, 0.99)}
    if faults:
        out["faults_median"] = statistics.median(faults)
    return out


def minor_faults() -> int:
    """The process's minor page faults so far (every thread's): a fresh page of memory touched costs one."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Servers:
    """Server processes, stopped at the end."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, name: str, cmd: list[str]) -> str:
        sock = f"unix:{self.tmp}/{name}.sock"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([self.tmp, str(HERE / "src")])}
        args = [sock if c == "{sock}" else c for c in cmd]
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("{"), f"{name} did not start"
        self.procs.append(p)
        return sock

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait()


def rounds(n: int, blocks: int) -> int:
    """How many rounds ``n`` calls per lane are made in: ``blocks``, or (0) rounds of at most 100 calls, at least 4."""
    return blocks if blocks > 0 else max(4, -(-n // 100))


def plan(lanes: dict[str, Callable[[], Any]], n: int, blocks: int) -> Iterator[tuple[int, str, Callable[[], Any]]]:
    """
    The order of the timed calls, as ``(round, lane, call)``: each lane's ``n`` calls in :func:`rounds` rounds, every
    lane a block of calls in each round, in an order shuffled per round (seeded: the same in every run), so that a
    drift or a burst of a shared machine's noise hits the lanes alike and no lane always follows the same one.
    """
    count = rounds(n, blocks)
    per = max(1, n // count)
    order = random.Random(0)
    for r in range(count):
        names = list(lanes)
        order.shuffle(names)
        for name in names:
            for _ in range(per):
                yield r, name, lanes[name]


def paired(times: dict[str, list[tuple[int, float]]], base: str) -> dict[str, float]:
    """
    Each lane's paired ratio to ``base``: per round, ``base``'s median time over the lane's median time, and the
    median of those over the rounds. Within a round the lanes ran back to back, so this follows slow drifts of the
    machine that a ratio of overall medians does not; both are reported.
    """

    def per_round(samples: list[tuple[int, float]]) -> dict[int, float]:
        by: dict[int, list[float]] = {}
        for r, t in samples:
            by.setdefault(r, []).append(t)
        return {r: statistics.median(ts) for r, ts in by.items()}

    b = per_round(times[base])
    out = {}
    for lane, samples in times.items():
        if lane != base:
            mine = per_round(samples)
            out[lane] = statistics.median(b[r] / t for r, t in mine.items() if r in b)
    return out


def run_lanes(
    lanes: dict[str, Callable[[], Any]], check: Callable[[str, Any], None], n: int, blocks: int
) -> dict[str, dict[str, float]]:
    """
    Times each lane ``n`` times in interleaved rounds (:func:`plan`), after 3 warm-up calls each; with the paired
    ratio of each lane to the first (``paired_speedup``, :func:`paired`).
    """
    for name, call in lanes.items():
        for _ in range(3):
            check(name, call())
    times: dict[str, list[tuple[int, float]]] = {k: [] for k in lanes}
    faults: dict[str, list[int]] = {k: [] for k in lanes}
    for r, name, call in plan(lanes, n, blocks):
        f = minor_faults()
        t = time.perf_counter()
        got = call()
        times[name].append((r, time.perf_counter() - t))
        faults[name].append(minor_faults() - f)
        check(name, got)
        del got
    return summarize(times, faults)


def summarize(times: dict[str, list[tuple[int, float]]], faults: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Each lane's :func:`summary`, with its :func:`paired` ratio to the first lane (``paired_speedup``)."""
    out = {k: summary([t for _, t in v], faults[k]) for k, v in times.items()}
    for lane, ratio in paired(times, next(iter(times))).items():
        out[lane]["paired_speedup"] = ratio
    return out


async def run_lanes_async(
    lanes: dict[str, Callable[[], Any]], check: Callable[[str, Any], None], n: int, blocks: int
) -> dict[str, dict[str, float]]:
    """:func:`run_lanes` for lanes that return awaitables (the asyncio part), timed on the running loop."""
    for name, call in lanes.items():
        for _ in range(3):
            check(name, await call())
    times: dict[str, list[tuple[int, float]]] = {k: [] for k in lanes}
    faults: dict[str, list[int]] = {k: [] for k in lanes}
    for r, name, call in plan(lanes, n, blocks):
        f = minor_faults()
        t = time.perf_counter()
        got = await call()
        times[name].append((r, time.perf_counter() - t))
        faults[name].append(minor_faults() - f)
        check(name, got)
        del got
    return summarize(times, faults)


def aio_part(blob: Any, blob_grpc: Any, target: str, sizes: list[int], blocks: int) -> list[dict[str, Any]]:
    """
    asyncio clients against ``shmgrpc serve``: stock ``grpc.aio`` against ``shmgrpc.aio`` with the code unchanged
    (and, below the threshold, stock ``grpc.aio`` sending a session's headers: what they cost without shmgrpc).
    ``shmgrpc (blocking)`` is the blocking client's call made from the loop, the same echo beside the asyncio ones.
    """
    import shmgrpc.aio

    async def run() -> list[dict[str, Any]]:
        stock = grpc.aio.insecure_channel(target, options=[("grpc.default_authority", "localhost"), *BIG])
        shm = shmgrpc.aio.insecure_channel(target)
        assert await shm.connect(), shm.fallback()
        blocking = shmgrpc.insecure_channel(target)
        assert blocking.is_shared_memory(), blocking.fallback()
        s_stub, o_stub = blob_grpc.BlobStub(stock), blob_grpc.BlobStub(shm)
        b_stub = blob_grpc.BlobStub(blocking)
        calls = itertools.count(1 << 40)
        session = shm._session
        assert session is not None
        rows = []
        for size in sizes:
            data = os.urandom(size)

            def check(name: str, r: Any, data: bytes = data) -> None:
                if r.data != data:
                    raise SystemExit(f"aio {name}: the reply differs from the request")

            def numbered() -> Any:
                return session.headers(next(calls))

            def stock_echo(data: bytes = data) -> Any:
                return s_stub.Echo(blob.Payload(data=data, crc32=0))

            def shm_echo(data: bytes = data) -> Any:
                return o_stub.Echo(blob.Payload(data=data, crc32=0))

            def headed_echo(data: bytes = data) -> Any:
                return s_stub.Echo(blob.Payload(data=data, crc32=0), metadata=numbered())

            async def blocking_echo(data: bytes = data) -> Any:
                return b_stub.Echo(blob.Payload(data=data, crc32=0))  # blocks the loop: nothing else runs on it

            lanes: dict[str, Callable[[], Any]] = {
                "grpc.aio": stock_echo,
                "shmgrpc.aio": shm_echo,
                "shmgrpc (blocking)": blocking_echo,
            }
            if size < shm.threshold:
                lanes["grpc.aio+headers"] = headed_echo
            res = await run_lanes_async(lanes, check, iterations(size), blocks)
            g = res["grpc.aio"]["median_ms"]
            n = iterations(size)
            row: dict[str, Any] = {"size": size, "calls": n // rounds(n, blocks) * rounds(n, blocks), **res}
            row["speedup shmgrpc.aio"] = g / res["shmgrpc.aio"]["median_ms"]
            rows.append(row)
            print(
                f"   aio {size:>10} B  grpc.aio {g:9.3f}  shmgrpc.aio {res['shmgrpc.aio']['median_ms']:8.3f} "
                f"(x{row['speedup shmgrpc.aio']:.2f}, paired x{res['shmgrpc.aio']['paired_speedup']:.2f})  "
                f"blocking {res['shmgrpc (blocking)']['median_ms']:8.3f}"
                + (
                    f"  grpc.aio+headers {res['grpc.aio+headers']['median_ms']:8.3f}"
                    if "grpc.aio+headers" in res
                    else ""
                )
                + f"  ms median; {row['calls']} calls",
                flush=True,
            )
        await shm.close()
        await stock.close()
        blocking.close()
        return rows

    return asyncio.run(run())


def echo_lanes(blob: Any, stubs_: dict[str, Any], channels: dict[str, Any], data: bytes) -> dict[str, Any]:
    """
    The lanes of an echo of ``data``. Each makes its request from ``data`` inside the timed call, as a producer
    does: a message with the field set (protobuf copies the value), or the payload written into a loan.
    """

    def loaned(ch: Any, stub: Any) -> Callable[[], Any]:
        def call() -> Any:
            loan = ch.loan(len(data))
            loan.write(data)  # timed: the producer's write, as with an ordinary message's construction
            r = stub.Echo(shmgrpc.loaned(blob.Payload(crc32=0), "data", loan))
            if isinstance(r, shmgrpc.View):
                r.release()  # timed: the release is part of every call's cycle
            return r

        return call

    return {
        "grpcio": lambda: stubs_["grpcio"].Echo(blob.Payload(data=data, crc32=0)),
        "shmgrpc": lambda: stubs_["shmgrpc"].Echo(blob.Payload(data=data, crc32=0)),
        "shmgrpc+loan": loaned(channels["shmgrpc"], stubs_["shmgrpc"]),
        "shmgrpc+loan+view": loaned(channels["viewing"], stubs_["viewing"]),
    }


def echo_part(
    title: str, blob: Any, blob_grpc: Any, targets: dict[str, str], sizes: list[int], blocks: int
) -> list[dict[str, Any]]:
    stock = grpc.insecure_channel(targets["grpcio"], options=[("grpc.default_authority", "localhost"), *BIG])
    shm = shmgrpc.insecure_channel(targets["shmgrpc"])
    viewing = shmgrpc.insecure_channel(targets["viewing"], views={ECHO: "data"})
    assert shm.is_shared_memory() and viewing.is_shared_memory(), (shm.fallback(), viewing.fallback())
    channels = {"shmgrpc": shm, "viewing": viewing}
    stubs_ = {"grpcio": blob_grpc.BlobStub(stock), "shmgrpc": blob_grpc.BlobStub(shm)}
    stubs_["viewing"] = blob_grpc.BlobStub(viewing)
    # The headers lane only where one server serves every lane (the Rust part): a grpcio server serves each of two
    # busy connections about 7% slower than one (two stock channels measured side by side with a third to a twin
    # server), so a second connection to the converted server alone would count against the shmgrpc lane.
    one_server = len(set(targets.values())) == 1
    opts = [("grpc.default_authority", "localhost"), *BIG]
    headed = grpc.insecure_channel(targets["shmgrpc"], options=opts) if one_server else None
    if headed is not None:
        stubs_["headers"] = blob_grpc.BlobStub(headed)
    rows = []
    for size in sizes:
        data = os.urandom(size)

        def check(name: str, r: Any, data: bytes = data) -> None:
            if isinstance(r, shmgrpc.View):
                return  # released inside the timed call; checked by the test suite
            if r.data != data:
                raise SystemExit(f"{title} {name}: the reply differs from the request")

        lanes = echo_lanes(blob, stubs_, channels, data)
        if size < shm.threshold and one_server:
            # What the headers cost without the client's glue: stock grpcio sending the session's headers (and
            # call numbers of its own, far from the channel's) to the converted server.
            calls = itertools.count(1 << 40)
            session = shm._session
            assert session is not None

            def headed_call(data: bytes = data, session: Any = session, calls: Any = calls) -> Any:
                numbered = session.headers(next(calls))  # what shmgrpc sends: one header from protocol version 4
                return stubs_["headers"].Echo(blob.Payload(data=data, crc32=0), metadata=numbered)

            lanes["grpcio+headers"] = headed_call
        n = iterations(size)
        # A loan's release crosses the side channel after its call: work for both processes' I/O threads that lands
        # on whichever lane runs next. So below the threshold the loan lanes run in rounds of their own, against a
        # stock lane of their own, and the small transparent calls are timed apart from them.
        loaned = {k: lanes.pop(k) for k in list(lanes) if "loan" in k} if size < shm.threshold else {}
        res = run_lanes(lanes, check, n, blocks)
        g = res["grpcio"]["median_ms"]
        speedups = {f"speedup {k}": g / v["median_ms"] for k, v in list(res.items())[1:]}
        row: dict[str, Any] = {"size": size, "calls": n // rounds(n, blocks) * rounds(n, blocks)}
        if loaned:
            apart = run_lanes({"grpcio": lanes["grpcio"], **loaned}, check, n, blocks)
            row["grpcio_in_loan_rounds"] = apart["grpcio"]
            speedups |= {f"speedup {k}": apart["grpcio"]["median_ms"] / apart[k]["median_ms"] for k in loaned}
            res |= {k: apart[k] for k in loaned}
        row |= res | speedups
        rows.append(row)
        print(
            f"{title:>6} {size:>10} B  grpcio {g:9.3f}  "
            + "  ".join(
                f"{k} {res[k]['median_ms']:8.3f} (x{row[f'speedup {k}']:.2f}, paired x{res[k]['paired_speedup']:.2f})"
                for k in list(res)[1:]
            )
            + f"  ms median; {row['calls']} calls",
            flush=True,
        )
    for ch in (stock, shm, viewing, headed):
        if ch is not None:
            ch.close()
    return rows


def array_part(blob: Any, blob_grpc: Any, targets: dict[str, str], nbytes: int) -> dict[str, Any]:
    n = nbytes // 4
    stock = grpc.insecure_channel(targets["grpcio"], options=[("grpc.default_authority", "localhost"), *BIG])
    viewing = shmgrpc.insecure_channel(targets["viewing"], views={ECHO: "data"})
    assert viewing.is_shared_memory(), viewing.fallback()
    s_stub, v_stub = blob_grpc.BlobStub(stock), blob_grpc.BlobStub(viewing)
    arr = np.arange(n, dtype=np.float32)

    def stock_call() -> float:
        reply = s_stub.Echo(blob.Payload(data=arr.tobytes()))
        out = np.frombuffer(reply.data, dtype=np.float32)
        return float(out[-1])

    def shm_call() -> float:
        t = time.perf_counter()
        loan = viewing.loan(nbytes)
        a = np.ndarray((n,), np.float32, buffer=loan)  # type: ignore[arg-type]  # numpy's stubs: a buffer from Python 3.12
        # The producer computes into `a` in place here (not timed: the stock lane's array exists already).
        del a
        view = v_stub.Echo(shmgrpc.loaned(blob.Payload(), "data", loan))
        out = np.frombuffer(view.data, dtype=np.float32)
        assert out.shape == (n,)
        del out
        view.release()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"grpcio": [], "shmgrpc+loan+view": []}
    shm_call()  # warm-up
    for _ in range(3):
        t = time.perf_counter()
        stock_call()
        times["grpcio"].append(time.perf_counter() - t)
        times["shmgrpc+loan+view"].append(shm_call())
    res = {k: summary(v) for k, v in times.items()}
    speedup = res["grpcio"]["median_ms"] / res["shmgrpc+loan+view"]["median_ms"]
    print(
        f" array {nbytes:>10} B  grpcio {res['grpcio']['median_ms']:9.1f}  loan+view "
        f"{res['shmgrpc+loan+view']['median_ms']:8.3f} ms median (x{speedup:.0f}); 3 calls",
        flush=True,
    )
    stock.close()
    viewing.close()
    return {"bytes": nbytes, "calls": 3, **res, "speedup": speedup}


def latency_part(blob: Any, blob_grpc: Any, target: str, seconds: float) -> dict[str, Any]:
    small_ch = shmgrpc.insecure_channel(target)
    small = blob_grpc.BlobStub(small_ch)
    tiny = blob.Payload(data=os.urandom(1024))
    size = 256 << 20
    payload = os.urandom(size)

    def smalls(duration: float) -> list[float]:
        ts = []
        end = time.perf_counter() + duration
        while time.perf_counter() < end:
            t = time.perf_counter()
            small.Echo(tiny)
            ts.append(time.perf_counter() - t)
        return ts

    def loaded(big_echo: Callable[[], None]) -> tuple[list[float], int]:
        stop = threading.Event()
        count = 0

        def load() -> None:
            nonlocal count
            while not stop.is_set():
                big_echo()
                count += 1

        t = threading.Thread(target=load)
        t.start()
        time.sleep(0.2)
        ts = smalls(seconds)
        stop.set()
        t.join()
        return ts, count

    transparent_ch = shmgrpc.insecure_channel(target)
    transparent = blob_grpc.BlobStub(transparent_ch)
    large = blob.Payload(data=payload)
    viewing_ch = shmgrpc.insecure_channel(target, views={ECHO: "data"})
    viewing = blob_grpc.BlobStub(viewing_ch)

    def echo_in_place() -> None:
        loan = viewing_ch.loan(size)
        view = viewing.Echo(shmgrpc.loaned(blob.Payload(), "data", loan))
        view.release()

    res: dict[str, Any] = {"quiet": summary(smalls(seconds))}
    for name, big_echo in (
        ("while_256MiB_loan_view_echoes", echo_in_place),
        ("while_256MiB_transparent_echoes", lambda: transparent.Echo(large)),
    ):
        ts, count = loaded(big_echo)
        res[name] = {**summary(ts), "calls": len(ts), "large_echoes": count}
    print(
        "latency 1 KiB p50/p99: " + "; ".join(f"{k} {v['median_ms']:.3f}/{v['p99_ms']:.3f} ms" for k, v in res.items()),
        flush=True,
    )
    for ch in (small_ch, transparent_ch, viewing_ch):
        ch.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "shmgrpc"))
    ap.add_argument("--sizes", default="1KiB,1MiB,20MiB,100MiB")
    ap.add_argument("--array", default="1GiB")
    ap.add_argument("--latency-seconds", type=float, default=5.0)
    ap.add_argument("--parts", default="rust,python,aio,array,latency")
    ap.add_argument("--json", default=None)
    ap.add_argument("--blocks", type=int, default=0, help="rounds per size (0: rounds of at most 100 calls per lane)")
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "shmgrpc-cli"], cwd=ROOT, check=True)
    parts = set(a.parts.split(","))
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        blob, blob_grpc = stubs(tmp)
        servers = Servers(tmp)
        try:
            py = [sys.executable, str(HERE / "tests" / "blob_server.py"), "{sock}"]
            rust = servers.start("rust", [a.bin, "serve", "--listen", "{sock}"])
            if "rust" in parts:
                targets = {"grpcio": rust, "shmgrpc": rust, "viewing": rust}
                report["rust"] = echo_part("rust", blob, blob_grpc, targets, sizes, a.blocks)
            if "python" in parts or "array" in parts:
                plain = servers.start("py-plain", [*py, "--plain"])
                converted = servers.start("py-shm", py)
                views = servers.start("py-views", [*py, "--views"])
                targets = {"grpcio": plain, "shmgrpc": converted, "viewing": views}
                if "python" in parts:
                    report["python"] = echo_part("python", blob, blob_grpc, targets, sizes, a.blocks)
                if "array" in parts:
                    report["array"] = array_part(blob, blob_grpc, targets, parse_size(a.array))
            if "aio" in parts:
                report["aio"] = aio_part(blob, blob_grpc, rust, sizes, a.blocks)
            if "latency" in parts:
                report["latency"] = latency_part(blob, blob_grpc, rust, a.latency_seconds)
        finally:
            servers.stop()
    report["shmgrpc_stats"] = shmgrpc.stats()
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
