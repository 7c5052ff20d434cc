"""Benchmark: a Python client against the Rust server (``shmgrpc serve``), stock grpcio against shmgrpc on the same
Unix socket, echo round trips of 1 KiB, 1 MiB, 20 MiB and 256 MiB. Transports alternate in blocks, so drifts of a
shared machine hit both alike; every reply is checked (outside the timed region).

    python bench.py [--bin target/release/shmgrpc] [--sizes 1KiB,1MiB,20MiB,256MiB] [--json out.json]

Four lanes: stock grpcio, shmgrpc with ordinary messages, shmgrpc with the request payload written into a loan
(``shmgrpc.loaned``), and the same with the reply's payload read in place (``views=``, a ``shmgrpc.View``). Prints a
table and writes JSON: per size and lane the median, p90 and p99 in milliseconds, and the ratios stock / shmgrpc of
the medians. Needs the demo service's stubs; they are generated into a temporary directory with grpcio-tools.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import grpc

import shmgrpc

ROOT = pathlib.Path(__file__).resolve().parents[1]
UNITS = {"KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(s: str) -> int:
    for unit, n in UNITS.items():
        if s.endswith(unit):
            return int(s[: -len(unit)]) * n
    return int(s)


def stubs(tmp: str) -> tuple[Any, Any]:
    from grpc_tools import protoc  # type: ignore[import-untyped]

    proto = ROOT / "crates" / "shmgrpc-demo" / "proto"
    assert protoc.main(["protoc", f"-I{proto}", f"--python_out={tmp}", f"--grpc_python_out={tmp}", "blob.proto"]) == 0
    sys.path.insert(0, tmp)
    import blob_pb2  # type: ignore[import-not-found]
    import blob_pb2_grpc  # type: ignore[import-not-found]

    return blob_pb2, blob_pb2_grpc


def iterations(size: int) -> int:
    if size <= 64 << 10:
        return 2000
    if size <= 4 << 20:
        return 300
    if size <= 64 << 20:
        return 40
    return 6


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "shmgrpc"))
    ap.add_argument("--sizes", default="1KiB,1MiB,20MiB,256MiB")
    ap.add_argument("--json", default=None)
    ap.add_argument("--blocks", type=int, default=4)
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "shmgrpc-cli"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        blob, blob_grpc = stubs(tmp)
        sock = f"unix:{tmp}/bench.sock"
        server = subprocess.Popen([a.bin, "serve", "--listen", sock], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            json.loads(server.stdout.readline())
            big = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
            stock = grpc.insecure_channel(sock, options=[("grpc.default_authority", "localhost"), *big])
            shm = shmgrpc.insecure_channel(sock)
            viewing = shmgrpc.insecure_channel(sock, views={"/shmgrpc.demo.v1.Blob/Echo": "data"})
            assert shm.is_shared_memory() and viewing.is_shared_memory(), shm.fallback()
            lanes = {
                "grpcio": blob_grpc.BlobStub(stock),
                "shmgrpc": blob_grpc.BlobStub(shm),
                "shmgrpc+loan": blob_grpc.BlobStub(shm),
                "shmgrpc+loan+view": blob_grpc.BlobStub(viewing),
            }

            def echo(name: str, stub: Any, msg: Any, data: bytes) -> Any:
                if name in ("grpcio", "shmgrpc"):
                    return stub.Echo(msg)
                # The request payload is written into a loan (timed: it is the copy a producer makes anyway) and
                # sent in place; the reply is parsed as usual, or read in place (a View).
                ch = shm if name == "shmgrpc+loan" else viewing
                loan = ch.loan(len(data))
                loan.view[:] = data
                return stub.Echo(shmgrpc.loaned(blob.Payload(crc32=0), "data", loan))

            results = []
            for size in [parse_size(s) for s in a.sizes.split(",")]:
                data = os.urandom(size)
                msg = blob.Payload(data=data, crc32=0)
                times: dict[str, list[float]] = {k: [] for k in lanes}
                for name, stub in lanes.items():
                    for _ in range(3):  # warm-up: connections, first buffers, mappings
                        r = echo(name, stub, msg, data)
                        if isinstance(r, shmgrpc.View):
                            r.release()
                n = max(1, iterations(size) // a.blocks)
                for _ in range(a.blocks):
                    for name, stub in lanes.items():
                        for _ in range(n):
                            t = time.perf_counter()
                            r = echo(name, stub, msg, data)
                            took = time.perf_counter() - t
                            if r.data != data:
                                raise SystemExit(f"{name}: the reply differs from the request")
                            if isinstance(r, shmgrpc.View):
                                t = time.perf_counter()
                                r.release()  # timed: the release is part of every call's cycle
                                took += time.perf_counter() - t
                            times[name].append(took)
                            del r
                row: dict[str, Any] = {"size": size, "calls": n * a.blocks}
                for name, ts in times.items():
                    ms = [t * 1e3 for t in ts]
                    row[name] = {"median_ms": statistics.median(ms), "p90_ms": pct(ms, 0.9), "p99_ms": pct(ms, 0.99)}
                row["speedup"] = row["grpcio"]["median_ms"] / row["shmgrpc"]["median_ms"]
                row["speedup_loan"] = row["grpcio"]["median_ms"] / row["shmgrpc+loan"]["median_ms"]
                row["speedup_loan_view"] = row["grpcio"]["median_ms"] / row["shmgrpc+loan+view"]["median_ms"]
                results.append(row)
                g, s_, lo, lv = row["grpcio"], row["shmgrpc"], row["shmgrpc+loan"], row["shmgrpc+loan+view"]
                print(
                    f"{size:>11} B  grpcio {g['median_ms']:9.3f}"
                    f"  shmgrpc {s_['median_ms']:9.3f} (x{row['speedup']:.2f})"
                    f"  +loan {lo['median_ms']:9.3f} (x{row['speedup_loan']:.2f})"
                    f"  +view {lv['median_ms']:9.3f} (x{row['speedup_loan_view']:.2f}) ms median;"
                    f"  p99 {g['p99_ms']:.3f} / {s_['p99_ms']:.3f} / {lo['p99_ms']:.3f} / {lv['p99_ms']:.3f} ms;"
                    f" {n * a.blocks} calls",
                    flush=True,
                )
            report = {
                "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
                "grpcio": grpc.__version__,
                "server": "shmgrpc serve (Rust, release)",
                "results": results,
                "shmgrpc_stats": shm.stats(),
            }
            if a.json:
                pathlib.Path(a.json).write_text(json.dumps(report, indent=2))
            shm.close()
            viewing.close()
            stock.close()
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
