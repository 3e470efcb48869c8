"""Helpers the kernel tests share (no fixtures): running a check script in Triton's interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_in_interpreter(script: Path, workdir: Path, timeout: float = 300) -> dict:
    """Run `script` in a fresh Python with TRITON_INTERPRET=1 (it must be set before triton is
    imported, hence the subprocess) and return the JSON report it prints last. The kernels then run
    on CPU tensors, which is how they are checked on a machine without a GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "kernels"), str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=workdir, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter check exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
