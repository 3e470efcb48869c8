"""The launcher: torchrun only when there are several processes; a stop it forwarded is a preemption."""

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.trainer

from kubetune.contract import EXIT_INVALID_INPUT, EXIT_PREEMPTED  # noqa: E402
from kubetune_trainer.launch import torchrun_arguments  # noqa: E402


def test_one_process_needs_no_torchrun(monkeypatch):
    for name in ("NNODES", "NPROC_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_arguments(None) is None
    assert torchrun_arguments(2) == ["--standalone", "--nproc-per-node", "2"]


def test_a_pod_of_a_multi_node_job_uses_the_operators_env(monkeypatch):
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    monkeypatch.setenv("MASTER_ADDR", "job-0.job-workers")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert torchrun_arguments(None) == [
        "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "8",
        "--master-addr", "job-0.job-workers", "--master-port", "29500",
    ]  # fmt: skip


def test_bad_input_exits_with_the_non_retryable_code(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\nspec: {model: {uri: 'ftp://x'}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "train", "-f", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == EXIT_INVALID_INPUT
    assert "spec.dataset: required field is missing" in result.stderr


def test_missing_data_fails_at_once_with_a_termination_message(tmp_path):
    from kubetune_trainer.tiny_model import build_tiny_model
    from tests.trainer.support import make_config, write_config

    model = build_tiny_model(tmp_path / "tiny")
    config = make_config(model, tmp_path, steps=2)
    config.spec.dataset.uri = f"file://{tmp_path}/none.jsonl"
    (tmp_path / "none.jsonl").write_text('{"unexpected": 1}\n')  # every row is bad
    path = write_config(config, tmp_path / "c.json")
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", "train", "-f", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == EXIT_INVALID_INPUT
    assert '"reason":"InvalidInput"' in (tmp_path / "termination-log").read_text()


def test_sigterm_to_the_launcher_is_forwarded_and_reported_as_preemption(tmp_path):
    from kubetune_trainer.tiny_model import build_tiny_model
    from tests.trainer.support import make_config, write_config

    model = build_tiny_model(tmp_path / "tiny")
    path = write_config(make_config(model, tmp_path, steps=5000, every_save=10**6), tmp_path / "c.json")
    command = [sys.executable, "-m", "kubetune", "train", "-f", str(path), "--nproc-per-node", "2"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    for line in launcher.stdout:
        if '"event": "step"' in line:
            break
        assert time.monotonic() < deadline
    launcher.send_signal(signal.SIGTERM)
    launcher.stdout.read()
    assert launcher.wait(timeout=120) == EXIT_PREEMPTED
    assert sorted(p.name for p in (tmp_path / "output" / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_a_stop_goes_to_the_workers_not_to_torchrun(tmp_path):
    """torchrun kills its workers 30 s after it is signalled; signalled directly, the workers take
    the time their checkpoint needs. Stand-ins: a parent that records a SIGTERM and two workers that
    record theirs and exit 143."""
    from kubetune_trainer.launch import stop_workers

    worker = (
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n"
        "    pathlib.Path(sys.argv[1]).write_text('stopped'); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "pathlib.Path(sys.argv[1] + '.up').write_text('up')\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import pathlib, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: pathlib.Path(sys.argv[1], 'parent').write_text('signalled'))\n"
        "workers = [subprocess.Popen([sys.executable, '-c', sys.argv[2], str(pathlib.Path(sys.argv[1], f'w{i}'))])\n"
        "           for i in range(2)]\n"
        "sys.exit(max(w.wait() for w in workers))\n"
    )
    torchrun = subprocess.Popen([sys.executable, "-c", parent, str(tmp_path), worker])
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"w{i}.up").exists() for i in range(2)):
        assert time.monotonic() < deadline and torchrun.poll() is None
        time.sleep(0.05)
    stop_workers(torchrun.pid, signal.SIGTERM)
    assert torchrun.wait(timeout=30) == 143
    assert (tmp_path / "w0").read_text() == (tmp_path / "w1").read_text() == "stopped"
    assert not (tmp_path / "parent").exists()
