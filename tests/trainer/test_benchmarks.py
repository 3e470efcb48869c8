"""Standard benchmarks (spec.evaluation.benchmarks): an lm-evaluation-harness task from local task
files, run on the tiny model with a LoRA adapter applied, without any network; the limit, an
unknown task, taskUri as a file:// folder and as one ConfigMap key; and the pure score filter."""

import math
import shutil
import socket

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")
pytest.importorskip("lm_eval", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune.api.evaluation import metric_problem  # noqa: E402
from kubetune.api.finetunejob import BenchmarksSpec  # noqa: E402
from kubetune.contract import CONFIGMAP_ROOT_ENV, ResultEvaluation  # noqa: E402
from kubetune.storage import StorageError  # noqa: E402
from kubetune_trainer import benchmarks  # noqa: E402
from tests.examples import REPO  # noqa: E402

TASKS = REPO / "tests" / "trainer" / "data" / "lm_eval_tasks"
TASK = "kubetune_tiny_qa"
QUESTIONS = 24  # lines in kubetune_tiny_qa.jsonl
GROUP = """
group: kubetune_tiny_group
task:
  - kubetune_tiny_qa
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def tuned(tiny_model):
    """The tiny model with a LoRA adapter of random (non-zero) weights: what the evaluation holds
    after applying a published adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to reach another machine (a name looked up, a connection), recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError(f"the test refuses network access {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def run(tuned, task_dir, cache, **spec):
    model, tokenizer = tuned
    return benchmarks.run_benchmarks(
        model, tokenizer, BenchmarksSpec(**{"tasks": [TASK], **spec}), "cpu", task_dir, batch_size=8, cache_dir=cache
    )


def test_a_local_task_scores_the_tuned_model_offline_within_the_limit(tuned, tmp_path, monkeypatch, no_network):
    import datasets.config

    monkeypatch.chdir(tmp_path)  # data_files is read beside the YAML file, not from the working directory
    offline_before = datasets.config.HF_HUB_OFFLINE

    scores, notes, seconds = run(tuned, TASKS, tmp_path / "cache", limit=5)

    assert list(scores) == [TASK], notes
    accuracy = scores[TASK]["acc,none"]
    assert math.isfinite(accuracy) and 0 <= accuracy <= 1
    assert abs(accuracy * 5 - round(accuracy * 5)) < 1e-9, "an accuracy over 5 examples is a multiple of 1/5"
    assert set(scores[TASK]) == {"acc,none", "acc_norm,none"}, "no standard errors, aliases or sample counts"
    assert notes == [f"benchmark {TASK}: 5 of {QUESTIONS} examples (limit 5)"]
    assert 0 < seconds < 300
    assert no_network == [], f"a local task tried the network: {no_network}"
    assert datasets.config.HF_HUB_OFFLINE == offline_before, "offline mode lasts only for the run"
    assert any((tmp_path / "cache" / "datasets").iterdir()), "datasets' cache goes under cache_dir"
    # What the operator reads back from the trainer's result keeps every score, and a rule can name each.
    assert ResultEvaluation.model_validate({"benchmarks": scores}).benchmarks == scores
    assert all(metric_problem(f"benchmarks.{TASK}.{metric}") is None for metric in scores[TASK])


def test_a_local_task_naming_a_hub_dataset_is_a_note_without_any_connection(tuned, tmp_path, no_network):
    """Only lm-eval's own tasks may download: task files from taskUri run with the Hub offline."""
    (tmp_path / "tasks").mkdir()
    yaml = (TASKS / f"{TASK}.yaml").read_text().replace("dataset_path: json", "dataset_path: kubetune-org/absent")
    (tmp_path / "tasks" / f"{TASK}.yaml").write_text(yaml)

    scores, notes, _ = run(tuned, tmp_path / "tasks", tmp_path / "cache", limit=2)

    assert scores == {}
    assert len(notes) == 1 and notes[0].startswith("benchmarks failed: ") and "\n" not in notes[0]
    assert no_network == [], f"a task from taskUri tried the network: {no_network}"


def test_an_unknown_task_is_one_clear_note_and_nothing_runs(tuned, tmp_path):
    scores, notes, _ = run(tuned, TASKS, tmp_path / "cache", tasks=[TASK, "no_such_benchmark"])

    assert scores == {}
    assert len(notes) == 1 and "\n" not in notes[0] and "Traceback" not in notes[0]
    assert "unknown benchmark task 'no_such_benchmark'" in notes[0]
    assert str(TASKS) in notes[0] and "lm-eval's own tasks" in notes[0]
    assert "spec.evaluation.benchmarks.tasks" in notes[0]


def test_task_uri_as_a_file_folder(tuned, tmp_path):
    copy = shutil.copytree(TASKS, tmp_path / "my tasks")
    task_dir = benchmarks.fetch_tasks(copy.as_uri(), cache_dir=tmp_path / "cache", local=True)
    assert task_dir == copy

    scores, notes, _ = run(tuned, task_dir, tmp_path / "cache", limit=3, numFewshot=2)

    assert 0 <= scores[TASK]["acc,none"] <= 1, notes
    assert notes == [f"benchmark {TASK}: 3 of {QUESTIONS} examples (limit 3)"]


def test_a_group_from_the_task_folder_runs_its_member_with_its_data(tuned, tmp_path, monkeypatch):
    copy = shutil.copytree(TASKS, tmp_path / "tasks")
    (copy / "groups").mkdir()
    (copy / "groups" / "tiny_group.yaml").write_text(GROUP)
    monkeypatch.chdir(tmp_path)

    scores, notes, _ = run(tuned, copy, tmp_path / "cache", tasks=["kubetune_tiny_group"], limit=4)

    assert list(scores) == ["kubetune_tiny_group", TASK], notes
    assert scores["kubetune_tiny_group"]["acc,none"] == scores[TASK]["acc,none"]


def test_task_uri_as_one_config_map_key_reads_its_data_from_the_other_key(tuned, tmp_path, monkeypatch):
    """A ConfigMap holds the YAML and the JSONL as two keys; taskUri names the YAML key."""
    shutil.copytree(TASKS, tmp_path / "configmaps" / "benchmarks")
    (tmp_path / "configmaps" / "benchmarks" / "unrelated.yaml").write_text("task: [not, a, task]\n")
    monkeypatch.setenv(CONFIGMAP_ROOT_ENV, str(tmp_path / "configmaps"))
    task_file = benchmarks.fetch_tasks(f"configmap://benchmarks/{TASK}.yaml", cache_dir=tmp_path / "cache", local=False)

    scores, notes, _ = run(tuned, task_file, tmp_path / "cache", limit=2)

    assert 0 <= scores[TASK]["acc,none"] <= 1, notes


def test_task_uri_mistakes_are_one_line(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    with pytest.raises(benchmarks.BenchmarkError, match="folder of lm-eval task YAML files"):
        benchmarks.fetch_tasks((tmp_path / "data.jsonl").as_uri(), cache_dir=tmp_path, local=True)
    with pytest.raises(StorageError, match="only works with `kubetune train` on your machine"):
        benchmarks.fetch_tasks(TASKS.as_uri(), cache_dir=tmp_path, local=False)


# --- pure -----------------------------------------------------------------------------------------


def test_scores_keep_finite_scores_under_names_a_rule_can_name():
    results = {
        "results": {
            "extra_subtask": {"acc,none": 0.5},
            "mine": {
                "alias": "mine",
                "sample_len": 5,
                "acc,none": 0.75,
                "acc_stderr,none": "N/A",
                "acc_norm,none": float("nan"),
                "f1,none": float("inf"),
                "flag,none": True,
                "exact_match,strict-match": 1,
                "exact match,none": 0.5,
            },
            "bad name!": {"acc,none": 0.1},
            "silent": {"alias": "silent"},
        }
    }

    scores, notes = benchmarks.scores_from(results, ["mine", "silent", "absent"])

    assert scores == {"mine": {"acc,none": 0.75, "exact_match,strict-match": 1.0}, "extra_subtask": {"acc,none": 0.5}}
    assert list(scores) == ["mine", "extra_subtask"], "the requested tasks come first"
    assert notes == [
        "benchmark silent: lm-eval reported no numeric score",
        "benchmark absent: lm-eval reported nothing",
    ]


def test_scores_are_capped_at_what_the_status_keeps():
    results = {"results": {f"t{i}": {f"m{j},none": 0.5 for j in range(30)} for i in range(30)}}

    scores, notes = benchmarks.scores_from(results, ["t0"])

    assert len(scores) == benchmarks.MAX_TASKS and all(len(s) == benchmarks.MAX_METRICS for s in scores.values())
    assert notes == [f"benchmarks: only the first {benchmarks.MAX_TASKS} tasks' scores are kept"]


def test_limit_notes_only_where_the_limit_cut():
    results = {"n-samples": {"a": {"original": 24, "effective": 5}, "b": {"original": 3, "effective": 3}}}
    assert benchmarks.limit_notes(results, 5) == ["benchmark a: 5 of 24 examples (limit 5)"]


def test_relative_data_files_are_read_beside_the_yaml_else_under_the_task_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "here.jsonl").write_text("{}\n")
    value = {
        "test": "here.jsonl",
        "train": ["data/*.jsonl", "hf://datasets/x/y.jsonl", "/abs/z.jsonl"],
        "validation": "https://example.org/v.jsonl",
    }

    made = benchmarks.local_data_files(value, tmp_path / "sub", tmp_path)

    assert made == {
        "test": str(tmp_path / "sub" / "here.jsonl"),
        "train": [str(tmp_path / "data/*.jsonl"), "hf://datasets/x/y.jsonl", "/abs/z.jsonl"],
        "validation": "https://example.org/v.jsonl",
    }
