"""Adapter merging on the tiny model: two LoRA adapters trained on disjoint tasks, merged, answer both
tasks better than either alone (on their validation sets); the merged folder is an ordinary adapter
that reloads with the same logits and that `kubetune generate` loads; `kubetune merge` writes it.

The tasks: questions about colours answered with one sentence, questions about counting answered with
another, each with validation rows about nouns the training rows never name. An adapter trained on one
task is confidently wrong on the other. Both adapters start from one initialisation (one seed) and take
a few small steps, the regime where adapter updates add up (task arithmetic): a merge that averages the
two updates then averages the two models' logits, roughly, and cross-entropy is convex in the logits,
so on each task the merge's loss is at most about the mean of the two adapters' losses there, below the
wrong adapter's; and because the two adapters disagree confidently, the convexity gap is large, which
puts the merge's mean loss below either adapter's mean. `linear` with its default weights (1/2 each)
and `ties` (1.0 each, where the two agree their entries are averaged) are such merges.
"""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune.contract import TrainerConfig  # noqa: E402
from kubetune_serve.merging import add_merged_adapter, merge_to_folder  # noqa: E402
from kubetune_trainer import train  # noqa: E402
from tests.trainer.support import make_config  # noqa: E402

NOUNS = [
    "apple", "river", "house", "garden", "window", "bridge", "forest", "letter", "train", "mountain",
    "lamp", "chair", "table", "cloud", "ocean", "pencil", "castle", "bottle", "street", "island",
    "candle", "mirror", "basket", "ladder", "carpet", "engine", "flower", "jacket", "kettle", "market",
    "needle", "pillow", "rocket", "saddle", "tunnel", "violin", "wagon", "yacht", "anchor", "barrel",
]  # fmt: skip
TASKS = {
    "colours": ("What colour is the {}?", "The colour is a soft shade of deep blue."),
    "numbers": ("How many {} can you count?", "I count exactly seven of them, no more."),
}
TRAIN_NOUNS, VALIDATION_NOUNS = NOUNS[:32], NOUNS[32:]


def write_task(task, nouns, path):
    question, reply = TASKS[task]
    rows = [
        {"messages": [{"role": "user", "content": question.format(noun)}, {"role": "assistant", "content": reply}]}
        for noun in nouns
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def task_config(tiny_model, folder, task):
    """A short LoRA job on one task: r 8 on q_proj and v_proj (the default targets) for both tasks, so
    every merge method applies; one seed, so both adapters start from the same A factors."""
    folder.mkdir(parents=True)
    train_file = write_task(task, TRAIN_NOUNS, folder / "train.jsonl")
    validation_file = write_task(task, VALIDATION_NOUNS, folder / "validation.jsonl")
    wire = make_config(tiny_model, folder, steps=20, every_save=1000, learningRate="1e-2").to_wire()
    wire["spec"]["dataset"] = {
        "uri": train_file.as_uri(),
        "format": "chat",
        "validation": {"uri": validation_file.as_uri()},
        "maxSeqLength": 64,
    }
    wire["spec"]["method"] = {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    return TrainerConfig.model_validate(wire)


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """{task: (adapter folder, validation examples)}, each adapter trained once for the module."""
    from kubetune.api.finetunejob import DatasetSpec
    from kubetune_trainer import data, methods

    root = tmp_path_factory.mktemp("merging")
    tokenizer = methods.load_tokenizer(tiny_model)
    trained = {}
    for task in TASKS:
        assert train.run_training(task_config(tiny_model, root / task, task)) == 0
        validation = root / task / "validation.jsonl"
        spec = DatasetSpec.model_validate({"uri": validation.as_uri(), "format": "chat", "maxSeqLength": 64})
        examples, _, _ = data.build_datasets(spec, validation, tokenizer, seed=0)
        trained[task] = (root / task / "output" / "adapter", examples)
    return trained


def base_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def with_adapter(tiny_model, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(tiny_model), folder).eval()


def answer_loss(model, examples):
    """Mean cross-entropy of the reply tokens, teacher-forced (the labels the trainer trains on)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            labels = torch.tensor(example.labels[1:])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def losses(model, adapters):
    return {task: answer_loss(model, examples) for task, (_, examples) in adapters.items()}


def mean(values):
    return sum(values.values()) / len(values)


@pytest.fixture(scope="module")
def single(tiny_model, adapters):
    """Each adapter's validation loss on both tasks."""
    return {task: losses(with_adapter(tiny_model, folder), adapters) for task, (folder, _) in adapters.items()}


@pytest.mark.parametrize(("method", "density"), [("linear", None), ("ties", 0.5)])
def test_the_merge_answers_both_tasks_better_than_either_adapter(
    tiny_model, adapters, single, tmp_path, method, density
):
    sources = [adapters["colours"][0], adapters["numbers"][0]]
    out = merge_to_folder(tiny_model, sources, None, method, density, tmp_path / "merged")

    merged = losses(with_adapter(tiny_model, out), adapters)
    colours, numbers = single["colours"], single["numbers"]
    assert colours["colours"] < colours["numbers"] and numbers["numbers"] < numbers["colours"], single  # it learned
    assert merged["colours"] < numbers["colours"], (merged, single)
    assert merged["numbers"] < colours["numbers"], (merged, single)
    assert mean(merged) < min(mean(colours), mean(numbers)), (merged, single)


def test_the_saved_merge_reloads_with_the_logits_of_the_merge_in_memory(tiny_model, adapters, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    sources = [adapters["colours"][0], adapters["numbers"][0]]
    model = PeftModel.from_pretrained(base_model(tiny_model), sources[0], adapter_name="colours")
    model.load_adapter(sources[1], adapter_name="numbers")
    add_merged_adapter(model, "both", ["colours", "numbers"], None, "ties", 0.5)
    model.set_adapter("both")
    batch = torch.tensor([adapters["colours"][1][0].input_ids])
    with torch.no_grad():
        expected = model.eval()(input_ids=batch).logits

    out = merge_to_folder(tiny_model, sources, None, "ties", 0.5, tmp_path / "merged")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as weights:
        assert all(".lora_A.weight" in key or ".lora_B.weight" in key for key in weights.keys())  # only one adapter
    with torch.no_grad():
        reloaded = with_adapter(tiny_model, out)(input_ids=batch).logits
    assert torch.allclose(reloaded, expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(base_model(tiny_model)(input_ids=batch).logits, expected, atol=1e-3)


def test_cat_is_the_exact_weighted_sum_and_its_rank_the_sum_of_ranks(tiny_model, adapters, tmp_path):
    from peft import PeftModel

    sources = [adapters["colours"][0], adapters["numbers"][0]]
    out = merge_to_folder(tiny_model, sources, [1.0, 0.5], "cat", None, tmp_path / "cat")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16

    model = PeftModel.from_pretrained(base_model(tiny_model), sources[0], adapter_name="colours")
    model.load_adapter(sources[1], adapter_name="numbers")
    model.load_adapter(out, adapter_name="cat")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["cat"].weight.shape[0] == 16
    expected = layer.get_delta_weight("colours") + 0.5 * layer.get_delta_weight("numbers")
    assert torch.allclose(layer.get_delta_weight("cat"), expected, atol=1e-6)


def test_dare_draws_the_same_merge_every_time(tiny_model, adapters):
    """Every replica that merges the same sources must serve the same adapter."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(tiny_model), adapters["colours"][0], adapter_name="colours")
    model.load_adapter(adapters["numbers"][0], adapter_name="numbers")
    torch.manual_seed(1)
    add_merged_adapter(model, "first", ["colours", "numbers"], None, "dare_ties", 0.5)
    after_first = torch.rand(1)
    add_merged_adapter(model, "second", ["colours", "numbers"], None, "dare_ties", 0.5)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    assert torch.equal(layer.lora_B["first"].weight, layer.lora_B["second"].weight)
    assert not torch.equal(layer.lora_B["first"].weight, layer.lora_B["colours"].weight)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_first), "the caller's random state is left as it was"
    with pytest.raises(ValueError, match="an adapter named 'first' is already loaded"):
        add_merged_adapter(model, "first", ["colours", "numbers"], None, "cat", None)
    with pytest.raises(ValueError, match="ties needs a density"):
        add_merged_adapter(model, "third", ["colours", "numbers"], None, "ties", None)


def test_rslora_sources_merge_to_the_sum_of_their_updates(tiny_model, tmp_path):
    """PEFT copies source 1's config, use_rslora included, onto the merge, whose factors already hold the
    sources' scalings: left so, the merged update would be sqrt(r) times too large."""
    from peft import LoraConfig, PeftModel, get_peft_model

    sources = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
        config.init_lora_weights = False  # random B too: a nonzero update
        get_peft_model(base_model(tiny_model), config).save_pretrained(tmp_path / f"rs{seed}")
        sources.append(tmp_path / f"rs{seed}")
    out = merge_to_folder(tiny_model, sources, None, "cat", None, tmp_path / "merged")
    assert json.loads((out / "adapter_config.json").read_text())["use_rslora"] is False

    model = PeftModel.from_pretrained(base_model(tiny_model), sources[0], adapter_name="one")
    model.load_adapter(sources[1], adapter_name="two")
    model.load_adapter(out, adapter_name="merged")
    layer = model.base_model.model.model.layers[0].self_attn.v_proj
    expected = layer.get_delta_weight("one") + layer.get_delta_weight("two")
    assert torch.allclose(layer.get_delta_weight("merged"), expected, atol=1e-6)


def test_kubetune_merge_writes_an_adapter_that_kubetune_generate_loads(tiny_model, adapters, tmp_path, capsys):
    from safetensors.torch import load_file

    from kubetune.cli import main

    out = tmp_path / "merged"
    result = subprocess.run(
        [
            sys.executable, "-m", "kubetune", "merge",
            "--model", tiny_model.as_uri(),
            "--adapter", adapters["colours"][0].as_uri(),
            "--adapter", str(adapters["numbers"][0]),
            "--method", "ties", "--density", "0.5",
            "-o", str(out),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote the ties merge of 2 adapters to {out}"
    in_process = merge_to_folder(
        tiny_model, [adapters["colours"][0], adapters["numbers"][0]], None, "ties", 0.5, tmp_path / "again"
    )
    first, again = (
        load_file(str(out / "adapter_model.safetensors")),
        load_file(str(in_process / "adapter_model.safetensors")),
    )
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)

    assert (
        main(["generate", "--model", tiny_model.as_uri(), "--adapter", out.as_uri(), "--max-new-tokens", "4", "Hi"])
        == 0
    )
    assert capsys.readouterr().out.strip()  # an answer, whatever its words
