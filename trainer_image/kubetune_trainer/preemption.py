"""How a worker tells torchrun's launcher that it stopped for a preemption.

In a job of several pods only the preempted pod gets SIGTERM; the other pods' workers stop with it
(the ranks agree after every step), checkpoint and exit 143, but torchrun reports 1 for them. The
launcher (launch.relaunch_with_torchrun) names a file in PREEMPTED_MARKER; a worker that stopped for
a preemption creates it, and the launcher then exits 143 too, which the Job's podFailurePolicy
ignores: a preemption never spends the Job's backoffLimit.
"""

import contextlib
import os
from pathlib import Path

PREEMPTED_MARKER = "KUBETUNE_PREEMPTED_MARKER"


def mark_preempted() -> None:
    if marker := os.environ.get(PREEMPTED_MARKER):
        with contextlib.suppress(OSError):
            Path(marker).touch()
