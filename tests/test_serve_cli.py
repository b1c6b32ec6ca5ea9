"""`python -m workloads.serve` end to end: its own local Ray (RAY_ADDRESS=local), the demo model when no checkpoint
is found, one request over HTTP, then SIGINT shuts everything down and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import read_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_serve_command_serves_until_sigint(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "workloads.serve", f"serve.port={port}", "serve.mode=colocated",
           f"run.storage_path={tmp_path}", f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        lines = read_until(proc, "[serve] ready")
        assert any("[serve] ready" in ln for ln in lines), "".join(lines)[-3000:]
        body = {"model": "ernie45-demo", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        lines.append(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert "RANDOM weights" in text and "[serve] stopped" in text
