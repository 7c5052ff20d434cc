"""The protocol's conformance suite (``shmgrpc conformance``, ``conformance/`` in the repository) against the
Python servers (threads, asyncio, views) and clients (sync and asyncio): every case passes, as against
``shmgrpc serve`` and ``shmgrpc call`` (``crates/shmgrpc-cli/tests/conformance.rs``)."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys
from typing import Any

import pytest

from .conftest import HERE, ROOT, _stop, start_py_server


@pytest.mark.parametrize("flavour", [[], ["--aio"], ["--views"]], ids=["threads", "asyncio", "views"])
def test_the_python_server_passes_every_conformance_case(
    bin_path: str, stubs_dir: str, tmp_path: pathlib.Path, flavour: list[str]
) -> None:
    s = start_py_server(stubs_dir, f"unix:{tmp_path / 'conf.sock'}", *flavour)
    try:
        out = subprocess.run(
            [bin_path, "conformance", "--json", "--target", s.unix], capture_output=True, text=True, timeout=300
        )
    finally:
        _stop(s)
    lines: list[dict[str, Any]] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    failed = [x for x in lines if not x["passed"]]
    assert not failed, failed
    assert out.returncode == 0, out.stderr
    assert len(lines) >= 40


@pytest.mark.parametrize("flavour", [[], ["--aio"], ["--future"]], ids=["sync", "asyncio", "future"])
def test_the_python_client_passes_every_client_conformance_case(
    bin_path: str, stubs_dir: str, flavour: list[str]
) -> None:
    client = [sys.executable, str(HERE / "conformance_client.py"), "{target}", *flavour]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([stubs_dir, str(ROOT / "python" / "src")])}
    out = subprocess.run(
        [bin_path, "conformance", "--json", "--client", shlex.join(client)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines: list[dict[str, Any]] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    failed = [x for x in lines if not x["passed"]]
    assert not failed, failed
    assert out.returncode == 0, out.stderr
    assert len(lines) >= 11
