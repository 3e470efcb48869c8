"""`kubetune train` and `kubetune plan`: a FineTuneJob manifest (local run) or the operator's
trainer config (in a pod) becomes a TrainerConfig; several local processes go through torchrun."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from kubetune.api import FineTuneJob, validate
from kubetune.api.manifest import load_documents, load_one, problems_from
from kubetune.contract import (
    DEFAULT_MASTER_PORT,
    ENV_MASTER_ADDR,
    ENV_MASTER_PORT,
    ENV_NNODES,
    ENV_NODE_RANK,
    ENV_NPROC_PER_NODE,
    EXIT_INVALID_INPUT,
    TERMINATION_LOG,
    RuntimeSettings,
    TrainerConfig,
    TrainerResult,
)
from kubetune.storage import local_cache

from .outcome import FAILURES_DIR, launcher_exit, read_failures
from .preemption import PREEMPTED_MARKER

LAUNCHED = "KUBETUNE_LAUNCHED"  # set by the torchrun re-launch so it does not recurse


def load_config(path: Path, metrics_port: int = 0) -> TrainerConfig:
    """A manifest with a FineTuneJob (a local run: file:// allowed, caches under ~/.cache/kubetune;
    other objects beside it, such as the PersistentVolumeClaim it trains from, are skipped) or a
    trainer config file with `spec` and `runtime` (what the operator mounts). Anything wrong with the
    file is a ValueError naming it, in one line, never a traceback."""
    try:
        return _load_config(Path(path), metrics_port)
    except (RecursionError, MemoryError):
        raise ValueError(f"{path}: nested too deeply or too large to be a manifest or a trainer config") from None


def _load_config(path: Path, metrics_port: int) -> TrainerConfig:
    documents = load_documents(path)  # within yamlsafe's size, depth and alias limits; one-line errors
    if any(isinstance(document, dict) and document.get("kind") == "FineTuneJob" for document in documents):
        job: FineTuneJob = load_one(path, "FineTuneJob", local=True)
        name = job.metadata.name or "local"
        run_dir = local_cache() / "runs" / name
        runtime = RuntimeSettings(
            job_name=name,
            local=True,
            metrics_port=metrics_port,
            cache_dir=str(run_dir),
            termination_message_path=str(run_dir / "termination-log"),
        )
        return TrainerConfig(spec=job.spec, runtime=runtime)
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ValueError(f"{path}: expected a FineTuneJob manifest or a trainer config (spec, runtime)")
    try:
        config = TrainerConfig.model_validate(documents[0])
    except ValidationError as error:
        problems = "; ".join(str(p) for p in problems_from(error)[:10])
        raise ValueError(f"{path}: neither a FineTuneJob manifest nor a valid trainer config: {problems}") from None
    problems = validate(FineTuneJob(spec=config.spec), local=config.runtime.local)
    if problems:
        raise ValueError(f"{path}: invalid trainer config: " + "; ".join(str(p) for p in problems[:10]))
    return config


def torchrun_arguments(nproc_flag: int | None) -> list[str] | None:
    """torchrun's arguments when this pod (or machine) runs several processes, else None.
    In a pod the operator sets NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT."""
    nnodes = int(os.environ.get(ENV_NNODES, 1))
    nproc = nproc_flag or int(os.environ.get(ENV_NPROC_PER_NODE, 1))
    if nnodes == 1 and nproc == 1:
        return None
    if nnodes == 1:
        return ["--standalone", "--nproc-per-node", str(nproc)]
    return [
        "--nnodes",
        str(nnodes),
        "--node-rank",
        os.environ[ENV_NODE_RANK],
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        os.environ[ENV_MASTER_ADDR],
        "--master-port",
        os.environ.get(ENV_MASTER_PORT, str(DEFAULT_MASTER_PORT)),
    ]


def relaunch_with_torchrun(argv: list[str], torchrun_args: list[str]) -> int:
    """One launcher path: several processes are torchrun's job, here and in a pod. torchrun reports
    1 whatever its workers exited with, so the workers leave word in a private folder: a SIGTERM (a
    preemption) goes straight to the workers (`stop_workers`), which checkpoint, mark it and exit
    143, reported as 143 again; a worker that failed records why (outcome.py), and the launcher
    writes that as the pod's termination message and exits with the worker's code: 2 stays 2."""
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "kubetune", *argv]
    scratch = Path(tempfile.mkdtemp(prefix="kubetune-launch-"))
    marker, failures = scratch / "preempted", scratch / "failures"
    failures.mkdir()
    env = {**os.environ, LAUNCHED: "1", PREEMPTED_MARKER: str(marker), FAILURES_DIR: str(failures)}
    child = subprocess.Popen(command, env=env)
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        stop_workers(child.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = child.wait()
    try:
        exit_code, failure = launcher_exit(code, bool(stopped) or marker.exists(), read_failures(failures))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if failure is not None:
        failure.result.write(failure.termination_path)
        print(
            f"kubetune train: rank {failure.rank}: {failure.result.reason}: {failure.result.message}", file=sys.stderr
        )
    return exit_code


def stop_workers(torchrun_pid: int, signum: int) -> None:
    """Signal torchrun's worker processes, not torchrun: torchrun would pass the signal on but kill
    the workers 30 s later, cutting short a large sharded checkpoint that the pod's grace period
    (the operator's checkpointGraceSeconds) leaves time for. The workers save in step (barriers), so
    when the first exits the others are done too, and torchrun then ends. Before the workers exist
    there is nothing to save: torchrun itself is signalled."""
    import psutil

    try:
        workers = psutil.Process(torchrun_pid).children()
    except psutil.NoSuchProcess:
        return
    for process in workers or [psutil.Process(torchrun_pid)]:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def train_main(path: Path, nproc: int | None, metrics_port: int, argv: list[str]) -> int:
    torchrun_args = None if os.environ.get(LAUNCHED) else torchrun_arguments(nproc)
    if torchrun_args:
        return relaunch_with_torchrun(argv, torchrun_args)
    from .train import run_training

    try:
        config = load_config(path, metrics_port)
    except (OSError, ValueError) as error:
        print(f"kubetune train: {error}", file=sys.stderr)
        _in_pod_termination_message(TrainerResult.failed("InvalidInput", str(error)))
        return EXIT_INVALID_INPUT
    return run_training(config)


def _in_pod_termination_message(result: TrainerResult) -> None:
    """A config that cannot be read does not say where the termination message goes; in a pod it is
    Kubernetes' own file, which exists there (and is not created on a workstation)."""
    if Path(TERMINATION_LOG).is_file():
        result.write(TERMINATION_LOG)
