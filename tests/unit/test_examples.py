"""`kubetune validate` accepts every example and rejects every invalid one with the recorded words."""

import subprocess
import sys

import pytest

from kubetune.api import check_file
from tests.examples import invalid_examples, valid_examples

EXPECTED_KINDS = {"FineTuneJob", "AdapterDeployment"}


def test_there_is_a_dozen_examples_of_both_kinds():
    assert len(valid_examples()) >= 12
    kinds = {c.kind for path in valid_examples() for c in check_file(path)}
    assert kinds == EXPECTED_KINDS


@pytest.mark.parametrize("path", valid_examples(), ids=lambda p: p.name)
def test_example_is_valid(path):
    results = check_file(path)
    assert results
    for checked in results:
        assert checked.ok, [str(p) for p in checked.problems]


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.path.name)
def test_invalid_example_is_rejected_with_its_message(example):
    (checked,) = check_file(example.path)
    assert not checked.ok
    said = "\n".join(str(p) for p in checked.problems)
    for expected in example.offline:
        assert expected in said


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kubetune", *args], capture_output=True, text=True)


def test_cli_validate_exit_codes_and_output():
    good = run_cli("validate", *[f"-f{p}" for p in valid_examples()])
    assert good.returncode == 0, good.stderr
    assert good.stdout.count(": valid") >= 12
    for example in invalid_examples():
        bad = run_cli("validate", "-f", str(example.path))
        assert bad.returncode == 2
        assert example.offline[0] in bad.stderr


def test_cli_validate_reports_unreadable_files(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = run_cli("validate", "-f", str(broken), "-f", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "broken.yaml" in result.stderr and "missing.yaml" in result.stderr
