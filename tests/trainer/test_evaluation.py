"""After training, the tuned model against the base: task metrics on the held-out split, the
forgetting check on the reference text, where the result goes, its limits and opt-out, a failing
evaluation that leaves the training standing, and `kubetune eval` on this machine."""

import json
import math

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune.cli import main  # noqa: E402
from kubetune.contract import TrainerConfig, TrainerResult  # noqa: E402
from kubetune_trainer import evaluation as ev  # noqa: E402
from kubetune_trainer import train  # noqa: E402
from tests.examples import REPO  # noqa: E402
from tests.trainer.support import DATA, make_config  # noqa: E402

PREFERENCES = REPO / "examples" / "data" / "support-preferences.jsonl"
STEPS = 80  # enough for the tiny model to start answering the support questions


def configured(tiny_model, out, steps, **spec):
    """make_config's job with parts of the spec replaced (camelCase, as in a manifest)."""
    wire = make_config(tiny_model, out, steps=steps, every_save=1000, evaluate=True).to_wire()
    wire["spec"].update(spec)
    return TrainerConfig.model_validate(wire)


def outcome(out):
    message = (out / "termination-log").read_text()
    report = json.loads((out / "output" / "report.json").read_text())
    return json.loads(message), report


@pytest.fixture(scope="module")
def tuned(tiny_model, tmp_path_factory):
    """A LoRA adapter trained on the support chat set, with the default evaluation."""
    out = tmp_path_factory.mktemp("evaluated")
    assert train.run_training(make_config(tiny_model, out, steps=STEPS, every_save=1000, evaluate=True)) == 0
    return out


def test_the_tuned_model_answers_its_validation_split_better_than_the_base(tuned):
    message, _ = outcome(tuned)
    evaluation = message["evaluation"]
    assert evaluation["examples"] == 5  # validation fraction 0.1 of the 48 conversations
    assert set(evaluation["metrics"]) == {"exactMatch", "tokenF1", "rougeL", "perplexity"}
    rouge = evaluation["metrics"]["rougeL"]
    assert rouge["delta"] > 0.05, evaluation
    assert rouge["delta"] == pytest.approx(rouge["tuned"] - rouge["base"], abs=1e-5)
    assert evaluation["metrics"]["tokenF1"]["tuned"] > evaluation["metrics"]["tokenF1"]["base"]
    # the cost: both models answered every example, within maxNewTokens (64) each
    assert 0 < evaluation["tokensGenerated"] <= 2 * 5 * 64
    assert evaluation["seconds"] > 0
    assert evaluation["notes"] == []


def test_the_forgetting_ratio_is_measured_on_the_reference_text(tuned):
    evaluation = outcome(tuned)[0]["evaluation"]
    perplexity, ratio = evaluation["metrics"]["perplexity"], evaluation["forgettingRatio"]
    assert math.isfinite(ratio) and ratio > 0
    assert ratio == pytest.approx(perplexity["tuned"] / perplexity["base"], rel=1e-4)
    assert 1 < perplexity["base"] < 2 * 1024  # a random model of a 1,024-token vocabulary: near uniform


def test_the_result_is_in_the_report_and_the_termination_message(tuned):
    message, report = outcome(tuned)
    assert report["evaluation"] == message["evaluation"]
    assert message["phase"] == "Succeeded"
    parsed, why = TrainerResult.parse((tuned / "termination-log").read_text())
    assert why == "" and parsed is not None and parsed.evaluation is not None
    assert parsed.evaluation.to_status() == {k: v for k, v in message["evaluation"].items() if v not in ([], {})}


def test_a_batch_answers_as_each_prompt_alone(tuned, tiny_model):
    """Left padding and the attention mask keep batched greedy answers equal to unbatched ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = ev.attach_adapter(AutoModelForCausalLM.from_pretrained(tiny_model), tuned / "output" / "adapter").eval()
    questions = ("How long are backups kept?", "What time does support answer?", "Hi")
    prompts = [[{"role": "user", "content": q}] for q in questions]
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=False) for p in prompts]
    items = [ev.GenerationItem(prompt, "") for prompt in ids]
    assert len({len(item.prompt_ids) for item in items}) == 3  # different lengths: the batch is padded
    batched, tokens = ev.generate_answers(model, tokenizer, items, 12, 2048, torch.device("cpu"))
    alone = [ev.generate_answers(model, tokenizer, [item], 12, 2048, torch.device("cpu"))[0][0] for item in items]
    assert batched == alone and any(batched)
    assert 0 < tokens <= 3 * 12


def test_held_out_examples_become_prompts_and_their_last_answers(tiny_model):
    from transformers import AutoTokenizer

    from kubetune.api.finetunejob import DatasetSpec
    from kubetune_trainer.data import build_datasets

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    spec = DatasetSpec.model_validate({"uri": DATA.as_uri(), "format": "chat", "packing": True})
    packed, _, _ = build_datasets(spec, DATA, tokenizer, seed=0)
    items = ev.generation_items(packed, tokenizer, limit=100)
    assert len(items) == 48  # unpacked again: one per conversation
    first = json.loads(DATA.read_text().splitlines()[0])["messages"]
    plain = ev.held_out_examples(spec.model_copy(update={"packing": False}), DATA, tokenizer, "data.jsonl")
    item = ev.generation_items(plain, tokenizer, limit=1)[0]  # file order
    assert item.reference == first[-1]["content"]
    assert item.prompt_ids == tokenizer.apply_chat_template(first[:-1], add_generation_prompt=True, return_dict=False)


def test_an_evaluation_file_and_the_limits(tiny_model, tmp_path):
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(DATA.read_text().splitlines(keepends=True)[:3]))
    evaluation = {"uri": held_out.as_uri(), "maxExamples": 2, "maxNewTokens": 4}
    assert train.run_training(configured(tiny_model, tmp_path, 2, evaluation=evaluation)) == 0
    result = outcome(tmp_path)[0]["evaluation"]
    assert result["examples"] == 2
    assert 0 < result["tokensGenerated"] <= 2 * 2 * 4


def test_benchmarks_from_a_task_folder_score_the_tuned_model(tiny_model, tmp_path):
    tasks = REPO / "tests" / "trainer" / "data" / "lm_eval_tasks"
    benchmarks = {"tasks": ["kubetune_tiny_qa"], "taskUri": tasks.as_uri(), "limit": 4}
    evaluation = {"maxExamples": 1, "maxNewTokens": 2, "benchmarks": benchmarks}
    assert train.run_training(configured(tiny_model, tmp_path, 2, evaluation=evaluation)) == 0
    message, report = outcome(tmp_path)
    score = report["evaluation"]["benchmarks"]["kubetune_tiny_qa"]["acc,none"]
    assert 0.0 <= score <= 1.0 and score * 4 == round(score * 4)  # 4 questions: a multiple of 1/4
    assert message["evaluation"]["benchmarks"] == report["evaluation"]["benchmarks"]  # the operator sees it
    missing = {**benchmarks, "taskUri": (tmp_path / "nowhere").as_uri()}
    evaluation = {"maxExamples": 1, "maxNewTokens": 2, "benchmarks": missing}
    assert train.run_training(configured(tiny_model, tmp_path / "again", 2, evaluation=evaluation)) == 0
    notes = outcome(tmp_path / "again")[0]["evaluation"]["notes"]
    assert any(note.startswith("benchmarks skipped: ") for note in notes)


def test_enabled_false_skips_it(tiny_model, tmp_path):
    config = configured(tiny_model, tmp_path, 2, evaluation={"enabled": False})
    assert train.run_training(config) == 0
    message, report = outcome(tmp_path)
    assert "evaluation" not in message and "evaluation" not in report
    assert message["metrics"]["evalLoss"] is not None  # the validation loss still is


def test_a_failing_evaluation_leaves_the_training_standing(tiny_model, tmp_path, capfd):
    missing = (tmp_path / "no-such-reference.txt").as_uri()
    config = configured(tiny_model, tmp_path, 2, evaluation={"referenceUri": missing})
    assert train.run_training(config) == 0
    message, report = outcome(tmp_path)
    assert message["phase"] == "Succeeded" and (tmp_path / "output" / "adapter" / "_COMPLETE").exists()
    assert message["evaluation"] == report["evaluation"]
    [note] = message["evaluation"]["notes"]
    assert note.startswith("evaluation failed: ") and "no-such-reference.txt" in note
    assert not message["evaluation"].get("metrics") and "forgettingRatio" not in message["evaluation"]
    assert '"event": "evaluation_failed"' in capfd.readouterr().out


def test_preference_data_is_scored_by_log_probabilities(tiny_model, tmp_path, capfd):
    dataset = {"uri": PREFERENCES.as_uri(), "format": "preference", "validation": {"fraction": 0.1}, "maxSeqLength": 96}
    config = configured(tiny_model, tmp_path, 2, objective="dpo", dataset=dataset)
    assert train.run_training(config) == 0
    result = outcome(tmp_path)[0]["evaluation"]
    assert set(result["metrics"]) == {"preferenceAccuracy", "rewardMargin", "perplexity"}
    assert result["tokensGenerated"] == 0 and result["examples"] == 5
    accuracy = result["metrics"]["preferenceAccuracy"]
    assert 0 <= accuracy["base"] <= 1 and 0 <= accuracy["tuned"] <= 1
    assert "forgettingRatio" in result
    # the cost is logged as one line
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if '"event": "evaluation"' in line]
    assert len(lines) == 1 and lines[0]["examples"] == 5 and "seconds" in lines[0]


def test_kubetune_eval_prints_the_table(tuned, tiny_model, capsys):
    adapter = tuned / "output" / "adapter"
    args = ["eval", "--model", str(tiny_model), "--adapter", adapter.as_uri(), "--data", str(DATA)]
    assert main([*args, "--max-examples", "4", "--max-new-tokens", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "base", "tuned", "delta"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:5]}
    assert list(rows) == ["exactMatch", "tokenF1", "rougeL", "perplexity"]
    assert float(rows["rougeL"][2]) > 0  # the first rows were trained on: the adapter knows them
    assert lines[5].startswith("forgetting ratio (perplexity tuned / base): ")
    assert lines[6].startswith("examples: 4  seconds: ") and "tokens generated: " in lines[6]

    assert main([*args, "--max-examples", "2", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 2 and 0 < result["tokensGenerated"] <= 2 * 2 * 4
    assert result["forgettingRatio"] > 0


def test_kubetune_eval_refuses_a_missing_file_in_one_line(tiny_model, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["eval", "--model", str(tiny_model), "--data", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"kubetune eval: --data {missing}: no such file or folder"
    assert captured.out == ""
    assert main(["eval", "--model", str(tmp_path), "--data", str(DATA)]) == 2
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert capsys.readouterr().err.strip() == f"kubetune eval: --model {tmp_path}: not a model folder (no config.json)"
    assert main(["eval", "--model", str(tiny_model), "--data", str(DATA), "--format", "preference"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the 48 rows is usable as preference data" in err
