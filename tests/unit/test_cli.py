"""The CLI: every command has help, and `kubetune crds --check` catches drift."""

import subprocess
import sys

import pytest

COMMANDS = ["crds", "validate", "tiny-model", "train", "plan", "generate", "serve", "operator", "upload"]


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


# --- a user's mistake is one clear message and exit code 2, never a traceback ------------------


def bad_inputs(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    not_ours = tmp_path / "not-ours.yaml"
    not_ours.write_text("kind: Deployment\nspec: {}\n")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n")
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n"
        "spec: {model: {uri: hf://a/b}, dataset: {uri: 'pvc://d/c.jsonl', format: chat}, output: {uri: ftp://x/y}}\n"
    )
    return {
        "missing": (tmp_path / "missing.yaml", "missing.yaml"),
        "broken": (broken, "not valid YAML"),
        "not ours": (not_ours, "not-ours.yaml"),
        "scalar": (scalar, "scalar.yaml"),
        "invalid": (invalid, "spec.output.uri"),
    }


CASES = ["missing", "broken", "not ours", "scalar", "invalid"]


@pytest.mark.parametrize(
    "command, case",
    [("validate", case) for case in CASES] + [(command, case) for command in ("plan", "train") for case in CASES[::2]],
)
def test_bad_manifests_and_missing_files_are_one_message_and_exit_2(command, case, tmp_path):
    path, words = bad_inputs(tmp_path)[case]
    result = kubetune(command, "-f", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and words in result.stderr, result.stderr
    assert result.stdout.strip() == ""


def test_an_unreadable_model_uri_is_one_message_and_exit_2():
    result = kubetune("generate", "--model", "file:///no/such/model", "hello")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("kubetune generate: file:///no/such/model:")


def test_hyperparameters_are_optional_in_a_manifest(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x, namespace: ml}\n"
        "spec: {model: {uri: hf://a/b}, dataset: {uri: pvc://d/chat.jsonl, format: chat}, output: {uri: pvc://o/x}}\n"
    )
    result = kubetune("validate", "-f", str(job))
    assert result.returncode == 0 and "FineTuneJob/x: valid" in result.stdout, result.stderr
