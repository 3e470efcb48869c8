"""A kwok pod's IP made real: kwok gives pods addresses that nothing answers on, so a test adds the
pod's IP to the loopback interface and serves there what the pod would, and the operator talks to
the pod at its own address over real HTTP, exactly as in a cluster.

Adding an address needs CAP_NET_ADMIN (root in CI). Without it, `serve_as_pod` says so and returns
False, and the test falls back to the operator's testing annotation — never silently."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@contextmanager
def address_on_loopback(address: str) -> Iterator[bool]:
    """Yields True while `address` is on `lo` (removed again on exit), False where it can't be added."""
    added = _ip("addr", "add", f"{address}/32", "dev", "lo")
    if added.returncode != 0 and "File exists" not in added.stderr:
        warnings.warn(
            f"cannot add the pod IP {address} to lo ({added.stderr.strip()}); "
            "the test reaches the replica through the operator's testing annotation instead",
            stacklevel=3,
        )
        yield False
        return
    try:
        yield True
    finally:
        _ip("addr", "del", f"{address}/32", "dev", "lo")
