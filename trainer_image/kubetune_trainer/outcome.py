"""How a failed worker tells torchrun's launcher why it failed.

torchrun reports 1 whatever its workers exited with, so a worker's exit 2 ("the input is wrong,
do not retry") would reach the Job as 1 and be retried `backoffLimit` times; and the worker that
failed first need not be rank 0, the one that writes the pod's termination message. So the
launcher (launch.relaunch_with_torchrun) names a private folder in FAILURES_DIR; a worker that fails
records there its exit code, its result (reason and message) and where the termination message
goes (`record_failure`). When torchrun fails, the launcher reads the records (`read_failures`),
writes the most telling one as the pod's termination message and exits with its code
(`launcher_exit`): any worker's exit 2 makes the pod's exit 2.
"""

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kubetune.contract import EXIT_INVALID_INPUT, EXIT_PREEMPTED, TERMINATION_LIMIT, TrainerResult

FAILURES_DIR = "KUBETUNE_FAILURES_DIR"
_RECORD_LIMIT = 4 * TERMINATION_LIMIT  # a record holds one termination message and a path


@dataclass(frozen=True)
class Failure:
    rank: int
    code: int
    result: TrainerResult
    termination_path: str


def record_failure(rank: int, code: int, result: TrainerResult, termination_path: str) -> None:
    """Leave this worker's failure for the launcher (a no-op when no launcher asked for it).
    Written under a temporary name and renamed, so the launcher never reads half a record."""
    folder = os.environ.get(FAILURES_DIR)
    if not folder:
        return
    record = {"rank": rank, "code": code, "result": result.termination_message(), "path": termination_path}
    target = Path(folder) / f"rank-{rank}.json"
    staging = target.with_name(f".{target.name}.tmp")
    with contextlib.suppress(OSError):
        staging.write_text(json.dumps(record))
        os.replace(staging, target)


def read_failures(folder: Path) -> list[Failure]:
    """The workers' records, in rank order; a record that is unreadable or not one is skipped."""
    failures = []
    for path in sorted(Path(folder).glob("rank-*.json")):
        try:
            if path.stat().st_size > _RECORD_LIMIT:
                continue
            record = json.loads(path.read_text())
            result, _ = TrainerResult.parse(str(record["result"]))
            rank, code, where = int(record["rank"]), int(record["code"]), str(record["path"])
        except (OSError, ValueError, TypeError, KeyError, RecursionError):
            continue
        if result is not None:
            failures.append(Failure(rank, code, result, where))
    return sorted(failures, key=lambda failure: failure.rank)


def chosen_failure(failures: list[Failure]) -> Failure | None:
    """A non-retryable failure first (bad input stays bad however often the pod restarts), then
    the lowest rank's: the others usually only saw their peers vanish."""
    final = [failure for failure in failures if failure.code == EXIT_INVALID_INPUT]
    return (final or failures or [None])[0]


def launcher_exit(torchrun_code: int, preempted: bool, failures: list[Failure]) -> tuple[int, Failure | None]:
    """The pod's exit code, and the failure to write as its termination message (None: leave it).

    Success is torchrun's 0. Otherwise a worker's exit 2 wins, then a preemption (143, which the
    Job's podFailurePolicy ignores), then the chosen worker's own code, then torchrun's."""
    if torchrun_code == 0:
        return 0, None
    chosen = chosen_failure(failures)
    if chosen is not None and chosen.code == EXIT_INVALID_INPUT:
        return EXIT_INVALID_INPUT, chosen
    if preempted:
        return EXIT_PREEMPTED, None
    if chosen is not None:
        return chosen.code or torchrun_code, chosen
    return torchrun_code, None
