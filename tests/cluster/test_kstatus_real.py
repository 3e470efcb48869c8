"""The real kstatus reads our statuses as we say it does.

tests/unit/test_kstatus.py checks every FineTuneJob and AdapterDeployment status the operator
derives against `kstatus` there, a transcription of cli-utils' rules. This test builds
sigs.k8s.io/cli-utils' own `status.Compute` (tests/kstatus/main.go, pinned in its go.mod and go.sum,
modules from the Go module proxy like the Kubernetes binaries) and hands it the same statuses, each
at the observed generation and at a newer one: the Go answers must be the transcription's, so Flux
and every other kstatus user read Current / InProgress / Failed where the unit tests expect them.

It lives in the cluster tier because that tier already needs the Go toolchain; it needs no cluster.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit import test_kstatus as rules

pytestmark = pytest.mark.cluster

SOURCE = Path(__file__).resolve().parents[1] / "kstatus"
BUILT = Path.home() / ".cache" / "kubetune" / "tools" / "kstatus-check"


def kstatus_binary() -> Path:
    """tests/kstatus built once per change of its sources (cached beside the project's other tools)."""
    go = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if go is None:
        pytest.skip("real kstatus check NOT RUN: no Go toolchain (the cluster tier's scripts/k8s-build.sh needs one)")
    stamp = hashlib.sha256(b"".join((SOURCE / name).read_bytes() for name in ("main.go", "go.mod", "go.sum")))
    binary = BUILT.with_name(f"kstatus-check-{stamp.hexdigest()[:16]}")
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        built = subprocess.run(
            [go, "build", "-trimpath", "-o", str(partial), "."],
            cwd=SOURCE,
            capture_output=True,
            text=True,
            timeout=900,
            env=dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=readonly"),
        )
        assert built.returncode == 0, built.stderr[-3000:]
        partial.replace(binary)  # atomic: a killed build leaves no half binary behind
    return binary


def readings() -> list[tuple[str, str, int, dict, str]]:
    """(kind, case, generation, object, expected reading) for every case, observed and not."""
    out = []
    for kind, generation, cases in (("FineTuneJob", 1, rules.ftj_cases()), ("AdapterDeployment", 3, rules.ad_cases())):
        for name, (status, _, _) in cases.items():
            for g in (generation, generation + 1):  # and a spec edit the operator has not seen yet
                obj = {
                    "apiVersion": "kubetune.io/v1alpha1",
                    "kind": kind,
                    "metadata": {"name": "x", "namespace": "ml", "generation": g},
                    "status": status,
                }
                out.append((kind, name, g, obj, rules.kstatus(g, status)))
    return out


def test_cli_utils_kstatus_reads_every_status_as_the_unit_tests_expect():
    cases = readings()
    assert {reading for *_, reading in cases} == {rules.CURRENT, rules.IN_PROGRESS, rules.FAILED}
    ran = subprocess.run(
        [str(kstatus_binary())],
        input=json.dumps([obj for _, _, _, obj, _ in cases]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    got = ran.stdout.split()
    assert len(got) == len(cases), ran.stdout
    pairs = zip(cases, got, strict=True)
    wrong = [(kind, name, g, want, real) for (kind, name, g, _, want), real in pairs if want != real]
    assert not wrong, wrong
