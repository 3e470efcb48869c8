"""The CLI: every command has help, and `kubetune crds --check` catches drift."""

import subprocess
import sys

import pytest

COMMANDS = ["crds", "validate", "tiny-model", "train", "plan", "generate", "serve", "operator"]


def kubetune(*args):
    return subprocess.run([sys.executable, "-m", "kubetune", *args], capture_output=True, text=True)


def test_top_level_help_lists_every_command():
    result = kubetune("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = kubetune(command, "--help")
    assert result.returncode == 0
    assert "usage: kubetune " + command in result.stdout


def test_crds_check_detects_drift(tmp_path):
    assert kubetune("crds", "--write", str(tmp_path)).returncode == 0
    assert kubetune("crds", "--check", str(tmp_path)).returncode == 0
    (tmp_path / "kubetune.io_finetunejobs.yaml").write_text("edited by hand\n")
    drifted = kubetune("crds", "--check", str(tmp_path))
    assert drifted.returncode == 1 and "kubetune.io_finetunejobs.yaml is stale" in drifted.stderr
