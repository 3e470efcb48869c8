"""Log lines and library noise, the same for the trainer, the serving runtime and the CLI."""

import json
import logging
import os
import sys
import time
import warnings
from typing import Any


def log(event: str, **fields: Any) -> None:
    """One JSON object per line on stdout: greppable by people, parseable by log pipelines."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    # One write of the whole line: processes that share a pipe (torchrun's ranks) then never
    # interleave within a line, also unbuffered (print writes the text and the newline apart).
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


def first_line(error: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, clipped: enough to recognise the failure in a condition,
    never a page of text (the whole story is in the log)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quiet_libraries() -> None:
    """Keep kubetune's own JSON log lines readable: libraries' progress bars and notices that do
    not apply here (bitsandbytes' optional CPU kernels, DeepSpeed's accelerator probe) go. Only
    environment variables and logger levels are touched, so this works before (and without)
    transformers, torch or DeepSpeed being imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda_device() else "cpu")
    for name in ("bitsandbytes", "DeepSpeed", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def _has_cuda_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
