"""On a CUDA GPU: every method trains and saves with a bf16 base, fp16 trains with loss scaling,
gradient checkpointing, merged weights and DPO.

Reported as NOT RUN on machines without a GPU (see tests/conftest.py)."""

import json
import math

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.trainer]

torch = pytest.importorskip("torch", reason="NOT RUN: gpu tier needs the [trainer] extra (make setup)")

from kubetune_trainer import train  # noqa: E402
from tests.examples import REPO  # noqa: E402
from tests.trainer.support import METHODS, make_config  # noqa: E402


def history_of(out) -> list[dict]:
    return json.loads((out / "output" / "report.json").read_text())["history"]


def finite(history) -> bool:
    return all(math.isfinite(entry["loss"]) for entry in history)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_and_saves_on_the_gpu_in_bf16(name, tiny_model, tmp_path):
    torch.cuda.reset_peak_memory_stats()
    config = make_config(
        tiny_model, tmp_path, steps=6, method=METHODS[name], every_save=1000, learningRate="1e-3", precision="bf16"
    )
    assert train.run_training(config) == 0
    result = json.loads((tmp_path / "termination-log").read_text())
    assert finite(history_of(tmp_path)), history_of(tmp_path)
    assert torch.cuda.max_memory_allocated() > 0
    adapter = tmp_path / "output" / "adapter"
    if name == "full":
        assert (adapter / "model.safetensors").exists() and result["trainableParams"] == result["totalParams"]
    else:
        assert (adapter / "adapter_config.json").exists() and result["trainableParams"] < result["totalParams"]


@pytest.mark.parametrize("name, rate", [("lora", "1e-2"), ("full", "1e-3")])
def test_fp16_trains_with_loss_scaling(name, rate, tiny_model, tmp_path):
    config = make_config(
        tiny_model, tmp_path, steps=24, method=METHODS[name], every_save=1000, learningRate=rate, precision="fp16"
    )
    assert train.run_training(config) == 0
    history = history_of(tmp_path)
    assert finite(history) and history[-1]["loss"] < history[0]["loss"], history


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_gradient_checkpointing_on_the_gpu(name, tiny_model, tmp_path):
    config = make_config(
        tiny_model,
        tmp_path,
        steps=20,
        method=METHODS[name],
        every_save=1000,
        precision="bf16",
        gradientCheckpointing=True,
    )
    assert train.run_training(config) == 0
    history = history_of(tmp_path)
    assert finite(history) and history[-1]["loss"] < history[0]["loss"], history


def test_merged_bf16_weights_match_base_plus_adapter(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tiny_model, tmp_path, steps=5, every_save=1000, precision="bf16")
    config.spec.output.merge_weights = True
    assert train.run_training(config) == 0
    batch = {"input_ids": torch.tensor([[5, 17, 42, 99, 3]])}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "output" / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "output" / "adapter"
    ).eval()
    with torch.no_grad():
        want, got, before = adapted(**batch).logits, merged(**batch).logits, base(**batch).logits
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.03 * scale  # the base was merged in bf16
    assert (want - before).abs().max() > 5 * (got - want).abs().max()  # and the adapter's effect survived


def test_dpo_on_the_gpu(tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path, steps=10, learningRate="5e-3", precision="bf16")
    config.spec.objective = "dpo"
    config.spec.dataset.format = "preference"
    config.spec.dataset.uri = f"file://{REPO}/examples/data/support-preferences.jsonl"
    assert train.run_training(config) == 0
    history = history_of(tmp_path)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-2)  # policy == reference at step 1
    assert finite(history) and history[-1]["loss"] < history[0]["loss"], history
