"""``bench.py`` runs end to end on small sizes (its numbers are for the docs, not for a test: only that every part
runs, checks its replies and reports what docs/python.md quotes)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

from .conftest import HERE


def test_the_benchmark_runs_every_part_and_reports_every_lane(bin_path: str, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--bin", bin_path, "--sizes", "1KiB,1MiB", "--array", "4MiB", "--latency-seconds", "0.3"]
    run = subprocess.run(
        [sys.executable, str(HERE.parent / "bench.py"), *args, "--blocks", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report: dict[str, Any] = json.loads(out.read_text())
    lanes = ["grpcio", "shmgrpc", "shmgrpc+loan", "shmgrpc+loan+view"]
    for part in ("rust", "python"):
        small, large = report[part]
        assert (small["size"], large["size"]) == (1024, 1 << 20)
        for row in (small, large):
            for lane in lanes:
                assert row[lane]["median_ms"] > 0 and row[lane]["faults_median"] >= 0, (part, row)
            for lane in lanes[1:]:
                assert row[f"speedup {lane}"] > 0 and row[lane]["paired_speedup"] > 0, (part, row)
        # Below the threshold the loan lanes ran in rounds of their own, against a stock lane of their own.
        assert small["grpcio_in_loan_rounds"]["median_ms"] > 0 and "grpcio_in_loan_rounds" not in large
    # Below the threshold, what the headers alone cost (stock grpcio sending them) is measured beside, where one
    # server serves every lane (a second connection to the converted Python server would slow the shmgrpc lane).
    assert report["rust"][0]["grpcio+headers"]["median_ms"] > 0 and "grpcio+headers" not in report["rust"][1]
    assert "grpcio+headers" not in report["python"][0]
    small, large = report["aio"]
    for row in (small, large):
        assert row["grpc.aio"]["median_ms"] > 0 and row["shmgrpc.aio"]["median_ms"] > 0, row
        assert row["shmgrpc (blocking)"]["median_ms"] > 0, row
        assert row["speedup shmgrpc.aio"] > 0 and row["shmgrpc.aio"]["paired_speedup"] > 0, row
    assert small["grpc.aio+headers"]["median_ms"] > 0 and "grpc.aio+headers" not in large
    assert report["array"]["speedup"] > 0
    assert set(report["latency"]) == {"quiet", "while_256MiB_loan_view_echoes", "while_256MiB_transparent_echoes"}
    assert report["shmgrpc_stats"]["shm_sent"] > 0
