"""The CLI: every command has help, and `kubetune crds --check` catches drift."""

import subprocess
import sys
import time

import pytest

from tests.examples import invalid_examples

COMMANDS = ["crds", "validate", "tiny-model", "train", "plan", "generate", "merge", "serve", "operator", "upload"]


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


# --- hostile and careless manifests (issue 14: findings 4 and 8) ---------------------------------

FTJ_HEAD = "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n"
GOOD_SPEC = (
    "spec: {model: {uri: 'hf://a/b'}, dataset: {uri: 'pvc://d/c.jsonl', format: chat}, output: {uri: 'pvc://o/x'}}\n"
)


def billion_laughs(where: str = "") -> str:
    """Nine levels of nine aliases: 9**9 strings once expanded (~390 million), 1 KiB of text."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):
        lines.append(f"a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * 9) + "]")
    body = "\n".join("    " + line for line in lines)
    return FTJ_HEAD + GOOD_SPEC.replace("spec: {", "spec: {resources: {affinity: {x: *a8}}, ", 1).replace(
        "spec:", f"bomb:\n{body}\nspec:", 1
    )


HOSTILE = {
    "billion laughs": (billion_laughs(), "expands to more than"),
    "deep nesting": ("[" * 200_000 + "]" * 200_000, "nested deeper than 100 levels"),
    "deep mapping": ("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 150)), "nested deeper than 100 levels"),
    "recursive alias": ("&a [*a]\n", "a cycle"),
    "many aliases": ("a: &a 1\nb: [" + ",".join(["*a"] * 101) + "]\n", "more than 100 aliases"),
    "scalar document": ("just words\n", "expected"),
    "list document": ("- 1\n- 2\n", "expected"),
    "empty file": ("", "no objects found"),
    "comments only": ("# nothing\n---\n", "no objects found"),
    "invalid UTF-8": (b"kind: \xff\xfe\n", "not UTF-8 text"),
    "too large": ("# " + "x" * (1 << 20) + "\n", "larger than 1024 KiB"),
    "python tag": ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "impossible date": ("when: 2026-02-31\n", "not valid YAML"),
    "huge integer": ("n: " + "9" * 5000 + "\n", "not valid YAML"),
    "metadata not a mapping": (
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: [1]\n" + GOOD_SPEC,
        "metadata",
    ),
    "kind not a string": ("apiVersion: kubetune.io/v1alpha1\nkind: [FineTuneJob]\n", "not a kubetune object"),
}


def write_case(tmp_path, case: str):
    text, words = HOSTILE[case]
    path = tmp_path / "manifest.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path, words


def in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """`kubetune ARGV` in this process (the trainer's imports are paid once for the whole module)."""
    from kubetune.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifests_are_one_line_exit_2_for_validate(case, tmp_path):
    path, words = write_case(tmp_path, case)
    started = time.monotonic()
    result = kubetune("validate", "-f", str(path))
    took = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and words in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith(str(path)) or line.startswith("  ") for line in lines), lines
    assert len(result.stderr) < 2000
    assert took < 30, f"{case} took {took:.1f}s"  # the unbounded loader took 40 s and more


@pytest.mark.parametrize("command", ["plan", "train"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifests_are_one_line_exit_2_for_plan_and_train(command, case, tmp_path, capsys):
    path, _ = write_case(tmp_path, case)
    started = time.monotonic()
    code, out, err = in_process(capsys, command, "-f", str(path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"kubetune {command}: {path}"), err
    assert time.monotonic() - started < 10, case


@pytest.mark.parametrize("command", ["plan", "train"])
def test_an_alias_bomb_in_affinity_is_refused_end_to_end(command, tmp_path):
    path, _ = write_case(tmp_path, "billion laughs")
    result = subprocess.run(
        [sys.executable, "-m", "kubetune", command, "-f", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"kubetune {command}: {path}: expands to more than 100000 values (aliases of aliases?); write it out"
    ]


def test_multi_document_files_are_checked_document_by_document(tmp_path):
    path = tmp_path / "two.yaml"
    bad = FTJ_HEAD.replace("name: x", "name: y") + GOOD_SPEC.replace("pvc://o/x", "pvc://o/../../x")
    path.write_text(FTJ_HEAD + GOOD_SPEC + "---\n" + bad + "---\n- a list\n")
    result = kubetune("validate", "-f", str(path))
    assert result.returncode == 2
    assert f"{path}: FineTuneJob/x: valid" in result.stdout
    assert f"{path}: FineTuneJob/y: invalid" in result.stderr and "spec.output.uri" in result.stderr
    assert "(document): expected a mapping" in result.stderr


@pytest.mark.parametrize("command", ["plan", "train"])
def test_plan_and_train_take_exactly_one_finetunejob(command, tmp_path, capsys):
    path = tmp_path / "two.yaml"
    path.write_text(FTJ_HEAD + GOOD_SPEC + "---\n" + FTJ_HEAD.replace("name: x", "name: y") + GOOD_SPEC)
    code, _, err = in_process(capsys, command, "-f", str(path))
    assert code == 2
    assert err.strip() == f"kubetune {command}: {path}: expected exactly one FineTuneJob, found 2 in 2 document(s)"


@pytest.mark.parametrize("example", invalid_examples(), ids=lambda e: e.path.name)
def test_plan_is_one_line_for_every_invalid_example(example, capsys):
    code, out, err = in_process(capsys, "plan", "-f", str(example.path))
    assert code == 2 and out == "", (example.path.name, out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("kubetune plan: "), err


def test_a_malformed_adapters_file_is_a_value_error():
    from kubetune.api.adaptersfile import parse_adapters_file

    for text in ("[" * 100_000 + "]" * 100_000, " " * (2 << 20) + "{}", '{"adapters": 3}'):
        with pytest.raises(ValueError):
            parse_adapters_file(text)
