"""loha, lokr, vera, oft, hra, fourierft and lnTuning, and LoRA+, on the tiny model on CPU: each
method trains (the validation loss falls), saves an adapter that reloads for inference as the
trained model computes, merges into the base as it computes, is counted by the planner as PEFT
counts it, and is served by `kubetune serve` (by adapter, as PEFT generates), the base model's
requests untouched beside it."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune.api.finetunejob import MethodSpec  # noqa: E402
from kubetune.planning import DecoderShape, method_trainable_params  # noqa: E402
from kubetune_serve.engine import Engine, EngineError, Sampling  # noqa: E402
from kubetune_trainer import methods, train  # noqa: E402
from kubetune_trainer.distributed import DistEnv  # noqa: E402
from tests.trainer.support import make_config  # noqa: E402

# Small settings for a 64-wide model; each method at a learning rate it trains well with.
MORE_METHODS = {
    "loha": ({"type": "loha", "loha": {"r": 4, "alpha": 8}}, "1e-2"),
    "lokr": ({"type": "lokr", "lokr": {"r": 4, "alpha": 8}}, "1e-2"),
    "vera": ({"type": "vera", "vera": {"r": 16, "targetModules": ["all-linear"]}}, "3e-2"),
    "oft": ({"type": "oft", "oft": {"blockSize": 16}}, "1e-2"),
    "hra": ({"type": "hra", "hra": {"r": 4}}, "1e-2"),
    "fourierft": ({"type": "fourierft", "fourierft": {"nFrequency": 64, "scaling": 10.0}}, "1e-2"),
    "lnTuning": ({"type": "lnTuning"}, "3e-2"),
}
STEPS = 12
GREEDY = Sampling(max_tokens=12, temperature=0, ignore_eos=True)


def tiny_shape(model_dir: Path) -> DecoderShape:
    config = json.loads((model_dir / "config.json").read_text())
    head = config["hidden_size"] // config["num_attention_heads"]
    return DecoderShape(
        config["hidden_size"],
        config["intermediate_size"],
        head * config["num_key_value_heads"],
        config["num_hidden_layers"],
    )


@pytest.fixture(scope="module", params=list(MORE_METHODS))
def trained(request, tiny_model, tmp_path_factory):
    """One method trained for a few steps and saved: (name, run, loss before, adapter folder)."""
    name = request.param
    method, learning_rate = MORE_METHODS[name]
    out = tmp_path_factory.mktemp(name)
    config = make_config(tiny_model, out, steps=STEPS, method=method, every_save=1000, learningRate=learning_rate)
    run = train.setup(config, DistEnv(0, 1, 0))
    before = train.evaluate(run)
    train.fit(run)
    train.save_outputs(run)
    return name, run, before, out / "output" / "adapter"


def test_trains_and_the_validation_loss_falls(trained):
    name, run, before, _ = trained
    evals = [entry["eval_loss"] for entry in run.state.history if entry.get("eval_loss") is not None]
    assert all(entry["loss"] == entry["loss"] for entry in run.state.history), f"{name}: NaN loss"
    assert evals and evals[-1] < before, (name, before, evals)


def test_the_planner_counts_what_peft_trains(trained, tiny_model):
    name, run, _, _ = trained
    trainable, _ = methods.count_parameters(run.model)
    assert run.plan.trainable_params == trainable
    method = MethodSpec.model_validate(MORE_METHODS[name][0])
    assert method_trainable_params(method, tiny_shape(tiny_model)) == trainable


def test_the_saved_adapter_reloads_and_merges_as_trained(trained, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, run, _, adapter = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lnTuning": "LN_TUNING"}.get(name, name.upper())
    batch = {"input_ids": torch.tensor([run.train_set[0].input_ids])}
    run.model.eval()
    with torch.no_grad():
        expected = run.model(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        plain = base(**batch).logits
        reloaded = PeftModel.from_pretrained(base, adapter).eval()
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5), name
        assert not torch.allclose(plain, expected, atol=1e-3), f"{name}: the adapter changes nothing"
        merged = reloaded.merge_and_unload()
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4), name


def test_served_by_adapter_as_peft_generates(trained, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, _, _, adapter = trained
    engine = Engine(str(tiny_model), "tiny", cache_dir=tmp_path / "cache")
    engine.load_base()
    ids = engine.encode("How do I reset my password?")
    base_alone = engine.generate("tiny", ids, GREEDY).text
    loaded = engine.load_adapter(name, f"file://{adapter}")
    assert loaded.grouping.startswith("by adapter (a ") and "only LoRA adapters are grouped" in loaded.grouping

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        steps = GREEDY.max_tokens
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    reference = engine.decode(out[0, len(ids) :].tolist())
    pending = [engine.start(name, ids, GREEDY), engine.start("tiny", ids, GREEDY)]  # one batch, two lanes
    served, base_beside = (p.result().text for p in pending)
    assert served == reference
    assert base_beside == base_alone, "the base model's requests must not go through the adapter"
    assert served != base_alone

    engine.unload_adapter(name)
    assert engine.generate("tiny", ids, GREEDY).text == base_alone


def test_an_adapter_of_another_type_is_refused_beside_them(tiny_model, tmp_path):
    """PEFT keeps one adapter type per model: a LoHa adapter beside a LoRA one is refused in one line
    (400: the deployment mixes types), and loads once the LoRA adapter is gone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    saved = {}
    for name, config in (
        ("plain", LoraConfig(r=4, target_modules=["q_proj"])),
        ("loha", methods.peft_config(MethodSpec.model_validate(MORE_METHODS["loha"][0]), 1, tiny_model)),
    ):
        saved[name] = tmp_path / name
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).save_pretrained(saved[name])
    engine = Engine(str(tiny_model), "tiny", cache_dir=tmp_path / "cache")
    engine.load_base()
    engine.load_adapter("plain", f"file://{saved['plain']}")
    with pytest.raises(EngineError) as refused:
        engine.load_adapter("loha", f"file://{saved['loha']}")
    assert refused.value.status == 400
    assert "it is a LOHA adapter and this server holds LORA adapters" in refused.value.message
    assert [a.name for a in engine.adapters()] == ["plain"]
    engine.unload_adapter("plain")
    assert engine.load_adapter("loha", f"file://{saved['loha']}").name == "loha"  # alone, it loads


def test_loraplus_gives_b_its_own_learning_rate(tiny_model, tmp_path):
    method = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "loraplusLrRatio": 16}}
    config = make_config(tiny_model, tmp_path, steps=4, method=method, every_save=1000, learningRate="1e-3")
    run = train.setup(config, DistEnv(0, 1, 0))
    groups = run.optimizer.param_groups
    assert [group["initial_lr"] for group in groups] == [pytest.approx(1e-3), pytest.approx(16e-3)]
    names = {id(p): n for n, p in run.model.named_parameters()}
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert len(groups[0]["params"]) == len(groups[1]["params"]) > 0
    before = train.evaluate(run)
    train.fit(run)
    assert run.state.history[-1]["loss"] == run.state.history[-1]["loss"]
    assert train.evaluate(run) < before
