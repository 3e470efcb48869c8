"""`kubetune train` and `kubetune plan`: a FineTuneJob manifest (local run) or the operator's
trainer config (in a pod) becomes a TrainerConfig; several local processes go through torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import yaml
from kubetune_operator.api import FineTuneJob, validate
from kubetune_operator.api.manifest import load_one
from kubetune_operator.api.trainerconfig import RuntimeSettings, TrainerConfig

LAUNCHED = "KUBETUNE_LAUNCHED"  # set by the torchrun re-launch so it does not recurse


def local_cache() -> Path:
    return Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune"))


def load_config(path: Path, metrics_port: int = 0) -> TrainerConfig:
    """A manifest with a FineTuneJob (a local run: file:// allowed, caches under ~/.cache/kubetune)
    or a trainer config file with `spec` and `runtime` (what the operator mounts)."""
    document = yaml.safe_load(Path(path).read_text())
    if isinstance(document, dict) and document.get("kind") == "FineTuneJob":
        job: FineTuneJob = load_one(path, "FineTuneJob", local=True)
        name = job.metadata.name or "local"
        run_dir = local_cache() / "runs" / name
        runtime = RuntimeSettings(
            job_name=name, local=True, metrics_port=metrics_port, cache_dir=str(run_dir),
            termination_message_path=str(run_dir / "termination-log"),
        )
        return TrainerConfig(spec=job.spec, runtime=runtime)
    config = TrainerConfig.model_validate(document)
    problems = validate(FineTuneJob(spec=config.spec), local=config.runtime.local)
    if problems:
        raise ValueError(f"{path}: invalid trainer config:\n" + "\n".join(f"  {p}" for p in problems))
    return config


def relaunch_with_torchrun(argv: list[str], nproc: int) -> int:
    """One launcher path: several processes on this machine are torchrun's job, as in a pod."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               "-m", "kubetune_operator.cli", *argv]
    return subprocess.call(command, env={**os.environ, LAUNCHED: "1"})


def train_main(path: Path, nproc: int, metrics_port: int, argv: list[str]) -> int:
    if nproc > 1 and not os.environ.get(LAUNCHED):
        return relaunch_with_torchrun(argv, nproc)
    from .train import run_training

    return run_training(load_config(path, metrics_port))


def quiet_libraries() -> None:
    """Keep the trainer's own JSON log lines readable: libraries' progress bars and notices that
    do not apply here (bitsandbytes' optional CPU kernels, DeepSpeed's accelerator probe) go."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda_device() else "cpu")
    for name in ("bitsandbytes", "DeepSpeed", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _has_cuda_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
