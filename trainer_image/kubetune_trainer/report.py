"""What a finished run says about itself: structured log lines, report.json and the termination message."""

import json
import sys
import time
from pathlib import Path

# Kubernetes keeps at most 4096 bytes of a container's termination message.
TERMINATION_LIMIT = 4096


def log(event: str, **fields) -> None:
    """One JSON object per line on stdout: greppable by people, parseable by log pipelines."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    print(json.dumps(record, default=str), flush=True)


def termination_message(result: dict) -> str:
    """The short result the operator reads from the pod status, kept under the 4 KiB limit by
    dropping the least important keys first."""
    message = dict(result)
    for key in ("data", "plan", "metrics"):
        text = json.dumps(message, separators=(",", ":"), default=str)
        if len(text.encode()) < TERMINATION_LIMIT:
            return text
        message.pop(key, None)
    essential = {k: message[k] for k in ("phase", "reason", "adapter") if k in message}
    if "message" in message:
        essential["message"] = str(message["message"])[:2000]
    return json.dumps(essential, separators=(",", ":"))


def write_termination_message(path: str, result: dict) -> None:
    try:
        Path(path).write_text(termination_message(result))
    except OSError as error:  # read-only or absent outside a pod: the log line still carries it
        print(f"could not write termination message to {path}: {error}", file=sys.stderr)
