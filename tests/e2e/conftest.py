"""The e2e tier: kubetune's container images run for real (tests/e2e/).

Needs a Docker engine and the images that `make images` builds (scripts/images.sh). Without
either, every e2e test is skipped with a loud "NOT RUN: e2e tier ..." reason, which the summary of
tests/conftest.py repeats at the end of the run.

The tier runs when asked for: `make test` asks (KUBETUNE_E2E=1) once it has built the images,
where this machine can run a Docker engine; `make test-e2e` and `pytest -m e2e` ask too. A plain
`pytest tests` reports it as NOT RUN, so a quick local run does not build GBs of images.

test_kind.py (markers e2e and kind) needs no Docker of its own: it runs against the cluster that
KUBETUNE_E2E_KUBECONFIG (else KUBECONFIG) names, with kubetune's chart installed. `make test` brings
kind up (`make kind-up`) and asks (KUBETUNE_E2E_KIND=1); where it cannot, the reason it passes in
KUBETUNE_E2E_KIND_PROBLEM is the NOT RUN reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
TRAINER_IMAGE = os.environ.get("KUBETUNE_TRAINER_IMAGE", f"kubetune/trainer:{VERSION}")
OPERATOR_IMAGE = os.environ.get("KUBETUNE_OPERATOR_IMAGE", f"kubetune/operator:{VERSION}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: real containers from kubetune's images (tests/e2e)")


def _requested(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    return os.environ.get("KUBETUNE_E2E") == "1" or ("e2e" in markexpr and "not e2e" not in markexpr)


def _docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "needs a Docker engine; no `docker` on PATH (`make images` installs and starts one, as root)"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return "needs a Docker engine; `docker info` did not answer within 30 s"
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        return f"needs a Docker engine; `docker info` fails ({why}); `make images` starts one (as root)"
    return None


def _missing_images(images: tuple[str, ...]) -> list[str]:
    return [
        image
        for image in images
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=30).returncode != 0
    ]


_problem: dict[str, str | None] = {}


def _kind_requested(config: pytest.Config) -> bool:
    markexpr = config.getoption("markexpr") or ""
    return os.environ.get("KUBETUNE_E2E_KIND") == "1" or any(
        word in markexpr and f"not {word}" not in markexpr for word in ("e2e", "kind")
    )


def _skip_kind(config, items) -> None:
    """The kind tier runs against the cluster KUBETUNE_E2E_KUBECONFIG (else KUBECONFIG) names."""
    from tests.e2e.kube import cluster_problem

    if not _kind_requested(config):
        reason = (
            "NOT RUN: e2e kind tier not asked for (it needs a cluster with the chart installed): `make test` "
            "brings kind up and asks where Docker can run kind; or `make kind-up` then `pytest -m kind` "
            "with KUBECONFIG=.cache/kind/kubeconfig"
        )
    else:
        problem = os.environ.get("KUBETUNE_E2E_KIND_PROBLEM") or cluster_problem()
        reason = f"NOT RUN: e2e kind tier: {problem}" if problem else None
    if reason:  # a loud NOT RUN with its cause, repeated in the tier summary: never a silent pass
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_collection_modifyitems(config, items):
    kind = [item for item in items if item.get_closest_marker("kind")]
    if kind:
        _skip_kind(config, kind)
    e2e = [item for item in items if item.get_closest_marker("e2e") and not item.get_closest_marker("kind")]
    if not e2e:
        return
    if not _requested(config):
        reason = (
            "NOT RUN: e2e tier not asked for (it needs Docker and the images): `make test` builds them "
            "and asks where Docker can run; or `make test-e2e`, `pytest -m e2e`, KUBETUNE_E2E=1"
        )
    else:
        reason = _docker_problem()
        if reason is None:
            missing = _missing_images((TRAINER_IMAGE, OPERATOR_IMAGE))
            if missing:
                reason = f"needs the image(s) {', '.join(missing)}; build them with `make images`"
        reason = f"NOT RUN: e2e tier {reason}" if reason else None
    if reason:
        for item in e2e:
            item.add_marker(pytest.mark.skip(reason=reason))


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `docker ARGS`; on failure the assertion shows the command and its output."""
    run = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert run.returncode == 0, (
            f"`docker {' '.join(args)}` exited {run.returncode}\n"
            f"--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-4000:]}"
        )
    return run


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder the containers' user (uid 1000) can read and write: pytest's own are 0700."""
    path = tmp_path_factory.mktemp("e2e")
    path.chmod(0o777)
    return path


@pytest.fixture(scope="session")
def tiny_model(shared_dir) -> Path:
    """The tiny Llama-style model, built on the host, readable by any uid."""
    from kubetune_trainer.tiny_model import build_tiny_model

    model = build_tiny_model(shared_dir / "tiny")
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model
