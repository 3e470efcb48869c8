"""Each clone has its own environment: `make setup` in a second clone gives that clone a .venv whose
`kubetune` command runs the second clone's code, and leaves the first clone's alone."""

import os
import shutil
import subprocess

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
