"""Each clone has its own environment: `make setup` in a second clone gives that clone a .venv whose
`kubetune` command runs the second clone's code, and leaves the first clone's alone."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.examples import REPO

pytestmark = pytest.mark.unit


def version_of(clone) -> str:
    result = subprocess.run([clone / ".venv/bin/kubetune", "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_a_second_clone_runs_its_own_code_with_its_own_command(tmp_path):
    if not (REPO / ".venv/bin/kubetune").exists():
        pytest.fail("this clone has no .venv: run `make setup` first")
    clone = tmp_path / "second-clone"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # this working tree as it is, uncommitted changes included
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    init = clone / "core/kubetune/__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "0.0.0+second-clone-'))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    setup = subprocess.run(["bash", "scripts/setup-venv.sh"], cwd=clone, env=env, capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr[-3000:]
    assert (clone / ".venv").is_dir() and not (clone / ".venv").is_symlink()
    assert version_of(clone).startswith("kubetune 0.0.0+second-clone-")
    assert "second-clone" not in version_of(REPO)


def test_the_core_runs_with_pydantic_and_pyyaml_alone(tmp_path):
    """`pip install kubetune` without extras: validate and crds work, and a subcommand that needs an
    extra says which one in one line (exit 2) instead of a traceback."""
    cache = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache/kubetune"))  # as scripts/lib/common.sh
    tools = sorted(cache.glob("tools/uv-*/bin/uv"))
    uv = str(tools[-1]) if tools else shutil.which("uv")
    if uv is None:
        pytest.fail("uv is not installed: run `make setup` first")
    constraints = tmp_path / "constraints.txt"
    lock = (REPO / "requirements/lock.txt").read_text().splitlines()
    constraints.write_text("\n".join(line.rstrip(" \\") for line in lock if "--hash=" not in line) + "\n")
    venv = tmp_path / "core-only"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("UV_CACHE_DIR", str(cache / "uv"))
    for command in (
        [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
        [
            uv,
            "pip",
            "install",
            "--quiet",
            "--offline",
            "--python",
            str(venv / "bin/python"),
            "-c",
            str(constraints),
            "--no-build-isolation",
            "--no-deps",
            "pydantic",
            "pydantic-core",
            "annotated-types",
            "typing-extensions",
            "typing-inspection",
            "pyyaml",
        ],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    run = {**env, "PYTHONPATH": str(REPO / "core")}  # the core alone, as `pip install kubetune` installs it
    python = str(venv / "bin/python")

    valid = subprocess.run(
        [python, "-m", "kubetune", "validate", "-f", str(REPO / "examples/adalora.yaml")],
        env=run,
        capture_output=True,
        text=True,
    )
    assert valid.returncode == 0 and ": valid" in valid.stdout, valid.stderr
    crds = subprocess.run(
        [python, "-m", "kubetune", "crds", "--check", str(REPO / "crds")], env=run, capture_output=True, text=True
    )
    assert crds.returncode == 0, crds.stderr
    train = subprocess.run(
        [python, "-m", "kubetune", "train", "-f", "job.yaml"], env=run, capture_output=True, text=True
    )
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert "needs the [trainer] extra" in train.stderr
