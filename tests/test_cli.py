"""The command line's contract with an orchestrator: exit codes and stdout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "slovenia" / "config.cfg"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sitsflow(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sitsflow", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def test_unreachable_object_storage_exits_75_after_retries():
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
           "SITSFLOW_STORAGE_RETRIES": "2", "SITSFLOW_STORAGE_BACKOFF": "0.01"}
    proc = _sitsflow("sample", "--config", str(EXAMPLE), "--set", "chain.output_path=s3://bucket/run", env=env)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert proc.stdout == ""  # nothing for the orchestrator to read


def test_bad_value_exits_2_and_plan_prints_json(tmp_path):
    proc = _sitsflow("plan", "inference", "--config", str(EXAMPLE), "--set", "python_data_managing.number_of_chunks=0")
    assert proc.returncode == 2 and "python_data_managing.number_of_chunks" in proc.stderr
    proc = _sitsflow("plan", "inference", "--config", str(EXAMPLE), "--set", f"chain.output_path={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # the plan is stored; stdout says where, and its shards
    assert summary["items"] == 4 and summary["shards"] == "4" and summary["per_shard"] == 1
    assert summary["plan"] == f"{tmp_path}/plans/inference.json"
    assert json.loads((tmp_path / "plans" / "inference.json").read_text())["items"] == [
        {"tile": "slovenia", "chunk": k, "seed": 0} for k in range(4)
    ]
