"""The trainer against careless and hostile input: every mistake of the user's ends in exit 2 and a
one-line InvalidInput termination message (under torchrun too), before any training step where it
can be known before; anything unexpected ends in exit 1 (retried) with a message all the same.

In-process runs (run_training) are the fast path; the CLI and torchrun are run for real where the
point is what a pod's process reports: its exit code and its termination message.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from kubetune.contract import EXIT_INVALID_INPUT, TrainerResult
from tests.examples import REPO
from tests.trainer.support import DATA, make_config, write_config

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune import storage  # noqa: E402
from kubetune.api.finetunejob import DatasetSpec  # noqa: E402
from kubetune_trainer import data, methods, train  # noqa: E402
from kubetune_trainer.launch import load_config  # noqa: E402
from kubetune_trainer.outcome import Failure, launcher_exit, read_failures, record_failure  # noqa: E402

DEEP = "[" * 200_000 + "]" * 200_000
GOOD_ROW = json.dumps(
    {"messages": [{"role": "user", "content": "When do you open?"}, {"role": "assistant", "content": "At eight."}]}
)


def termination(out) -> TrainerResult:
    result, why = TrainerResult.parse((out / "termination-log").read_text())
    assert result is not None, why
    return result


def assert_invalid_input(code, out, *fragments):
    """Exit 2 and a Failed/InvalidInput termination message: one line holding every fragment."""
    assert code == EXIT_INVALID_INPUT
    result = termination(out)
    assert (result.phase, result.reason) == ("Failed", "InvalidInput"), result
    assert result.message and "\n" not in result.message and "Traceback" not in result.message
    for fragment in fragments:
        assert fragment in result.message, result.message
    return result.message


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if a run gets as far as loading the base model or stepping."""
    reached = []
    monkeypatch.setattr(methods, "load_base_model", lambda *a, **k: reached.append("model") or 1 / 0)
    monkeypatch.setattr(train, "train_step", lambda *a, **k: reached.append("step") or 1 / 0)
    return reached


def run(config, capfd=None):
    code = train.run_training(config)
    if capfd is not None:
        assert "Traceback" not in capfd.readouterr().err
    return code


# --- exit 2 under torchrun ----------------------------------------------------------------------


def test_a_workers_exit_2_is_the_launchers_exit_2_under_torchrun(tiny_model, tmp_path):
    """torchrun reports 1 for a worker's 2; the launcher reads the worker's record and exits 2 with
    its reason, so the Job's podFailurePolicy (FailJob on 2) fires instead of backoffLimit retries."""
    config = make_config(tiny_model, tmp_path, steps=2)
    bad = tmp_path / "deep.jsonl"
    bad.write_text(DEEP + "\n")
    config.spec.dataset.uri = bad.as_uri()
    path = write_config(config, tmp_path / "c.json")
    command = [sys.executable, "-m", "kubetune", "train", "-f", str(path), "--nproc-per-node", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert_invalid_input(result.returncode, tmp_path, "row 1: line 1: JSON nested too deeply", bad.as_uri())
    assert "RecursionError" not in result.stderr
    assert not (tmp_path / "output" / "checkpoints").exists()


def test_the_launcher_prefers_a_non_retryable_failure_of_any_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_FAILURES_DIR", str(tmp_path))
    peer_gone = TrainerResult.failed("UnexpectedError", "RuntimeError: Connection closed by peer")
    bad_rows = TrainerResult.failed("InvalidInput", "pvc://data/train.jsonl: 40 of 48 rows ...")
    record_failure(0, 1, peer_gone, str(tmp_path / "termination-log"))
    record_failure(3, 2, bad_rows, str(tmp_path / "termination-log"))
    (tmp_path / "rank-9.json").write_text("[" * 5000)  # a torn or hostile record is skipped, not fatal
    failures = read_failures(tmp_path)
    assert [(f.rank, f.code) for f in failures] == [(0, 1), (3, 2)]
    code, chosen = launcher_exit(1, False, failures)
    assert (code, chosen.rank, chosen.result.reason) == (2, 3, "InvalidInput")
    assert launcher_exit(1, True, failures)[0] == 2, "bad input stays bad after a preemption"
    assert launcher_exit(1, True, failures[:1]) == (143, None)
    assert launcher_exit(1, False, failures[:1])[0] == 1
    assert launcher_exit(1, False, []) == (1, None)
    assert launcher_exit(0, False, failures) == (0, None)
    assert isinstance(chosen, Failure)


# --- no tracebacks: deep rows, models that are not models, the unexpected -------------------------


def test_a_row_nested_200k_deep_is_one_bad_row_not_a_crash(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([DEEP] + [GOOD_ROW] * 199) + "\n")
    records = data.read_records(path)
    assert isinstance(records[0], data.BadRecord) and records[0].reason == "line 1: JSON nested too deeply"
    _, _, report = data.build_datasets(DatasetSpec(uri=path.as_uri(), format="chat"), path, tok, seed=0)
    assert (report.rows, report.bad_rows) == (200, 1)  # 0.5%: under the default 1%, skipped and counted

    whole = tmp_path / "d.json"
    whole.write_text(DEEP)
    with pytest.raises(ValueError, match=r"d\.json: cannot read as json: nested too deeply"):
        data.read_records(whole)
    cell = tmp_path / "d.csv"
    cell.write_text("messages\n" + json.dumps(DEEP[:20_000] + DEEP[-20_000:]) + "\n" + '"[]"\n')
    spec = DatasetSpec(uri=cell.as_uri(), format="chat", max_bad_row_fraction=1.0)
    with pytest.raises(ValueError, match="none of the 2 rows"):
        data.build_datasets(spec, cell, tok, seed=0)


def test_a_deep_jsonl_dataset_fails_with_invalid_input_and_no_traceback(tiny_model, tmp_path, capfd, no_training):
    config = make_config(tiny_model, tmp_path, steps=2)
    bad = tmp_path / "deep.jsonl"
    bad.write_text(DEEP + "\n" + DEEP + "\n")
    config.spec.dataset.uri = bad.as_uri()
    assert_invalid_input(run(config, capfd), tmp_path, "none of the 2 rows", "nested too deeply")
    assert no_training == []


def test_a_model_uri_naming_a_file_fails_with_invalid_input(tiny_model, tmp_path, capfd, no_training):
    config = make_config(tiny_model, tmp_path, steps=2)
    config.spec.model.uri = (tiny_model / "config.json").as_uri()
    assert_invalid_input(run(config, capfd), tmp_path, config.spec.model.uri, "a file, not a model folder")
    assert no_training == []


@pytest.mark.parametrize(
    "damage",
    [
        {"config.json": b"{not json"},
        {"config.json": DEEP.encode()},
        {"config.json": b'{"model_type": "no-such-architecture"}'},
        {"tokenizer.json": b"\xff\xfe garbage"},
    ],
    ids=["config-not-json", "config-deep", "unknown-architecture", "tokenizer-garbage"],
)
def test_an_unloadable_model_folder_fails_with_invalid_input(damage, tiny_model, tmp_path, capfd):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    for name, content in damage.items():
        (folder / name).write_bytes(content)
    config = make_config(folder, tmp_path, steps=2)
    message = assert_invalid_input(run(config, capfd), tmp_path, f"spec.model.uri {folder.as_uri()}")
    assert "not a model transformers can load" in message


def test_model_weights_that_are_garbage_fail_with_invalid_input(tiny_model, tmp_path, capfd):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    for weights in folder.glob("*.safetensors"):
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64))
    config = make_config(folder, tmp_path, steps=2)
    assert_invalid_input(run(config, capfd), tmp_path, f"spec.model.uri {folder.as_uri()}")


def test_an_unexpected_error_is_retryable_and_still_says_what_happened(tiny_model, tmp_path, monkeypatch):
    def broken(run):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(train, "fit", broken)
    code = train.run_training(make_config(tiny_model, tmp_path, steps=2))
    assert code == 1
    result = termination(tmp_path)
    assert (result.phase, result.reason) == ("Failed", "UnexpectedError")
    assert result.message == "RuntimeError: CUDA error: an illegal memory access was encountered"


# --- the output location is probed before anything else -----------------------------------------


def test_an_impossible_output_fails_before_the_model_is_loaded(tiny_model, tmp_path, monkeypatch, no_training):
    """pvc://data/notes.txt/out lies under a file: refused at once, in the user's words (the claim's
    URI, not the folder it is mounted at), before any download, model or step."""
    root = tmp_path / "pvc"
    (root / "data").mkdir(parents=True)
    (root / "data" / "notes.txt").write_text("a file")
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(root))
    config = make_config(tiny_model, tmp_path, steps=2)
    config.spec.output.uri = "pvc://data/notes.txt/out"
    message = assert_invalid_input(train.run_training(config), tmp_path, "pvc://data/notes.txt/out", "not writable")
    assert str(root) not in message
    assert no_training == []


def read_only_command(folder, command):
    """`command` run where `folder` is read-only: a read-only bind mount in a private mount namespace
    (root ignores permission bits), or permission bits for anyone else; None where neither works."""
    unshare = shutil.which("unshare")
    if unshare:
        probe = subprocess.run([unshare, "-rm", "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            remount = f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' && exec \"$@\""
            return [unshare, "-rm", "sh", "-c", remount, "sh", *command]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return command
    return None


def test_a_read_only_output_fails_before_any_step(tiny_model, tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    config = make_config(tiny_model, tmp_path, steps=2, every_save=1)
    config.spec.output.uri = folder.as_uri()
    path = write_config(config, tmp_path / "c.json")
    command = read_only_command(folder, [sys.executable, "-m", "kubetune", "train", "-f", str(path)])
    if command is None:
        # Root ignores permission bits, so only a read-only bind mount (unshare -rm) proves this as root;
        # a machine allowing neither says so loudly (the conftest's NOT RUN summary) instead of passing.
        # The impossible-output test above covers the same probe on every machine.
        pytest.skip("NOT RUN: no way to make a read-only folder here (root without user namespaces)")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert_invalid_input(result.returncode, tmp_path, folder.as_uri(), "not writable")
    assert '"event": "step"' not in result.stdout and "Traceback" not in result.stderr
    assert list(folder.iterdir()) == []  # no checkpoint, and no probe left behind


# --- encodings and the bad-row threshold ----------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "name"),
    [("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32")],
)
@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_a_utf16_or_utf32_file_is_named_as_such(encoding, name, suffix, tmp_path):
    path = tmp_path / f"train.{suffix}"
    text = {"jsonl": GOOD_ROW + "\n", "json": f"[{GOOD_ROW}]", "csv": "text\nhello\n"}[suffix]
    path.write_text(text * 20, encoding=encoding)
    with pytest.raises(ValueError, match=rf"the file is {name}; convert it to UTF-8"):
        data.read_records(path)
    assert data.wide_encoding(DATA) is None


def test_a_utf16_dataset_fails_with_invalid_input_instead_of_training_on_one_row(tiny_model, tmp_path, capfd):
    """The example dataset saved as UTF-16 by an editor: before, one of its 48 rows parsed, the run
    trained on it and reported Succeeded."""
    utf16 = tmp_path / "support-chat.jsonl"
    utf16.write_text(DATA.read_text(), encoding="utf-16")
    config = make_config(tiny_model, tmp_path, steps=2)
    config.spec.dataset.uri = utf16.as_uri()
    message = assert_invalid_input(run(config, capfd), tmp_path, utf16.as_uri())
    assert message.endswith("the file is UTF-16; convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)")


def rows_with_bad(good: int, bad: list[str]) -> str:
    return "\n".join(bad + [GOOD_ROW] * good) + "\n"


def test_more_bad_rows_than_the_threshold_fail_with_three_examples(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    path = tmp_path / "train.jsonl"
    hostile_role = json.dumps({"messages": [{"role": "x" * 5000, "content": "hi"}]})
    path.write_text(rows_with_bad(97, ["{not json", hostile_role, '{"text": "wrong format"}']))
    uri = "pvc://datasets/chat/train.jsonl"  # what the user wrote; `path` is where it is mounted
    with pytest.raises(ValueError) as caught:
        data.build_datasets(DatasetSpec(uri=uri, format="chat"), path, tok, seed=0)
    message = str(caught.value)
    assert message.startswith(f"{uri}: 3 of 100 rows (3.0%) are not usable as chat data, more than ")
    assert "maxBadRowFraction allows (0.01)" in message and str(path) not in message and "\n" not in message
    quoted = message.split("(0.01): ", 1)[1].split("; fix or remove", 1)[0].split("; ")
    assert [q.split(":", 1)[0] for q in quoted] == ["row 1", "row 2", "row 3"]
    assert all(len(q) <= data.REASON_LIMIT for q in quoted) and quoted[1].endswith("...")

    spec = DatasetSpec(uri=uri, format="chat", max_bad_row_fraction=0.05)
    train_set, _, report = data.build_datasets(spec, path, tok, seed=0)
    assert (report.rows, report.bad_rows, len(train_set)) == (100, 3, 97)
    assert all(len(reason) <= data.REASON_LIMIT for reason in report.bad_examples)

    path.write_text(rows_with_bad(99, ["{not json"]))  # exactly 1%: still allowed
    _, _, report = data.build_datasets(DatasetSpec(uri=uri, format="chat"), path, tok, seed=0)
    assert report.bad_rows == 1


def test_a_run_over_the_bad_row_threshold_fails_before_any_step(tiny_model, tmp_path, capfd, no_training):
    path = tmp_path / "train.jsonl"
    path.write_text(rows_with_bad(40, ['{"text": "wrong format"}'] * 8))
    config = make_config(tiny_model, tmp_path, steps=2)
    config.spec.dataset.uri = path.as_uri()
    assert_invalid_input(run(config, capfd), tmp_path, "8 of 48 rows", "row 1: missing 'messages'")
    assert no_training == []


def test_bad_rows_under_the_threshold_are_counted_in_the_result(tiny_model, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(rows_with_bad(47, ["{not json"]))
    config = make_config(tiny_model, tmp_path, steps=1)
    config.spec.dataset.uri = path.as_uri()
    config.spec.dataset.max_bad_row_fraction = 0.05
    assert train.run_training(config) == 0
    result = termination(tmp_path)
    assert result.phase == "Succeeded" and result.data is not None and result.data.bad_rows == 1


# --- the config file itself -----------------------------------------------------------------------


def test_load_config_takes_a_multi_document_manifest_and_refuses_hostile_yaml(tmp_path):
    manifest = tmp_path / "job.yaml"
    job = (REPO / "examples" / "cpu-one-pod.yaml").read_text()
    assert job.count("\n---") >= 1  # a PVC beside the job, as the example ships
    manifest.write_text(job)
    assert load_config(manifest).spec.output.uri
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="deep.yaml: .*nested") as caught:
        load_config(deep)
    assert "\n" not in str(caught.value)
    two = tmp_path / "two.yaml"
    two.write_text("a: 1\n---\nb: 2\n")
    with pytest.raises(ValueError, match="expected a FineTuneJob manifest or a trainer config"):
        load_config(two)
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [\n")
    with pytest.raises(ValueError, match="not valid YAML") as caught:
        load_config(broken)
    assert "\n" not in str(caught.value)


# --- storage: the probe itself ----------------------------------------------------------------------


def test_the_probe_leaves_nothing_and_names_the_users_uri(tmp_path, monkeypatch):
    root = tmp_path / "pvc"
    (root / "data").mkdir(parents=True)
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(root))
    output = storage.open_output("pvc://data/runs/a", cache_dir=tmp_path)
    output.probe()
    assert [p.name for p in (root / "data" / "runs" / "a").iterdir()] == []
    (root / "data" / "file").write_text("x")
    with pytest.raises(storage.OutputNotWritable, match=r"^pvc://data/file/out: the output location is not") as e:
        storage.open_output("pvc://data/file/out", cache_dir=tmp_path).probe()
    assert str(root) not in str(e.value)


@pytest.mark.usefixtures("isolated_env")
def test_the_s3_probe_refuses_a_missing_bucket_for_good(s3, tmp_path):
    from tests.trainer.support import keys

    client, bucket = s3
    storage.open_output(f"s3://{bucket}/runs/a", cache_dir=tmp_path).probe()
    assert keys(client, bucket) == []
    with pytest.raises(storage.OutputNotWritable, match=rf"s3://{bucket}-missing/x: the bucket does not exist"):
        storage.open_output(f"s3://{bucket}-missing/x", cache_dir=tmp_path).probe()


def test_a_config_that_cannot_be_read_still_leaves_a_termination_message_in_a_pod(tmp_path, monkeypatch, capsys):
    from kubetune_trainer import launch

    pod_log = tmp_path / "termination-log"
    pod_log.write_text("")  # Kubernetes creates it in every container
    monkeypatch.setattr(launch, "TERMINATION_LOG", str(pod_log))
    monkeypatch.delenv("KUBETUNE_LAUNCHED", raising=False)
    for name in ("NNODES", "NPROC_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "trainer.yaml"
    config.write_text("spec: [\n")
    assert launch.train_main(config, None, 0, []) == EXIT_INVALID_INPUT
    assert "not valid YAML" in capsys.readouterr().err
    assert_invalid_input(EXIT_INVALID_INPUT, tmp_path, "trainer.yaml", "not valid YAML")


def test_plan_refuses_a_model_file_and_a_deep_config_in_one_line(tiny_model, tmp_path):
    from kubetune_trainer.plan import plan_for_config

    config = make_config(tiny_model, tmp_path)
    config.spec.model.uri = (tiny_model / "config.json").as_uri()
    with pytest.raises(ValueError, match="a file, not a model folder"):
        plan_for_config(config)
    folder = tmp_path / "deep-model"
    shutil.copytree(tiny_model, folder)
    (folder / "config.json").write_text(DEEP)
    config.spec.model.uri = folder.as_uri()
    with pytest.raises(ValueError, match=r"not a model transformers can load \(RecursionError") as caught:
        plan_for_config(config)
    assert "\n" not in str(caught.value)
