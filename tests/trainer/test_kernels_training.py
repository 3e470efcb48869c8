"""`kernels: auto` against `kernels: none` on real training of the tiny model: the same loss curve,
what is patched and what falls back (and why), `none` as today's recipe bit for bit, DPO's log-probs,
and regional compilation."""

import json

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune_trainer import acceleration, train  # noqa: E402
from kubetune_trainer.distributed import DistEnv  # noqa: E402
from tests.examples import REPO  # noqa: E402
from tests.trainer.support import adapter_weights, make_config  # noqa: E402


def losses(out) -> list[float]:
    report = json.loads((out / "output" / "report.json").read_text())
    return [entry["loss"] for entry in report["history"]]


def trained(tiny_model, out, **hyper):
    assert train.run_training(make_config(tiny_model, out, every_save=1000, **hyper)) == 0
    return json.loads((out / "output" / "report.json").read_text())


def test_auto_trains_the_same_loss_curve_as_none_in_fp32(tiny_model, tmp_path):
    auto = trained(tiny_model, tmp_path / "auto", kernels="auto")
    none = trained(tiny_model, tmp_path / "none", kernels="none")
    assert auto["kernels"]["patched"] == [
        "chunked cross-entropy (torch)",
        "fused LoRA MLP x2",
        "fused LoRA QKV x2",
        "LoRA linear x14",
    ]
    assert none["kernels"]["patched"] == [] and none["kernels"]["fallbacks"] == []
    curve_auto = [entry["loss"] for entry in auto["history"]]
    curve_none = [entry["loss"] for entry in none["history"]]
    assert len(curve_auto) == 30 and curve_auto[-1] < 0.7 * curve_auto[0]
    assert curve_auto == pytest.approx(curve_none, rel=2e-4, abs=1e-4)
    evals = [(a.get("eval_loss"), n.get("eval_loss")) for a, n in zip(auto["history"], none["history"], strict=True)]
    assert all(a == pytest.approx(n, rel=2e-4) for a, n in evals if n is not None)
    ours, theirs = adapter_weights(tmp_path / "auto"), adapter_weights(tmp_path / "none")
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, rtol=1e-3, atol=1e-4), name


def test_none_is_todays_recipe_byte_for_byte(tiny_model, tmp_path, monkeypatch):
    trained(tiny_model, tmp_path / "none", kernels="none", steps=8)
    # Today's recipe: nothing between PEFT and the strategy.
    monkeypatch.setattr(acceleration, "accelerate", lambda *args, **kwargs: acceleration.Acceleration())
    trained(tiny_model, tmp_path / "plain", kernels="auto", steps=8)
    assert losses(tmp_path / "none") == losses(tmp_path / "plain")
    adapter = "output/adapter/adapter_model.safetensors"
    assert (tmp_path / "none" / adapter).read_bytes() == (tmp_path / "plain" / adapter).read_bytes()


def test_none_patches_nothing(tiny_model, tmp_path):
    run = train.setup(make_config(tiny_model, tmp_path, kernels="none"), DistEnv(0, 1, 0))
    assert not acceleration.fused_loss(run.model)
    assert not [name for name, module in run.model.named_modules() if "forward" in vars(module)]


def test_a_method_the_lora_kernels_do_not_take_falls_back_with_its_reason(tiny_model, tmp_path):
    dora = {"type": "dora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    run = train.setup(make_config(tiny_model, tmp_path, method=dora), DistEnv(0, 1, 0))
    report = run.accelerated
    assert report.patched == ["chunked cross-entropy (torch)"]
    assert len(report.fallbacks) == 1 and "DoRA" in report.fallbacks[0], report.fallbacks
    assert not [name for name, module in run.model.named_modules() if "forward" in vars(module)][1:], "only the head"


def test_prompt_tuning_keeps_the_plain_loss_and_says_why(tiny_model, tmp_path):
    method = {"type": "promptTuning", "virtualTokens": {"numVirtualTokens": 4}}
    run = train.setup(make_config(tiny_model, tmp_path, method=method), DistEnv(0, 1, 0))
    assert run.accelerated.patched == []
    assert any("virtual tokens" in line for line in run.accelerated.fallbacks), run.accelerated.fallbacks
    assert not acceleration.fused_loss(run.model)


def test_the_fused_loss_equals_the_logits_loss_on_a_batch(tiny_model, tmp_path):
    from kubetune_trainer.data import collate

    run = train.setup(make_config(tiny_model, tmp_path), DistEnv(0, 1, 0))
    assert acceleration.fused_loss(run.model)
    batch = collate(run.train_set[:4], run.tokenizer.pad_token_id)
    fused, count = train.token_loss_sum(run.model, dict(batch))
    labels = batch["labels"]
    logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    plain = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    assert count == int((labels[:, 1:] != -100).sum()) > 0
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)


def test_dpo_with_kernels_matches_dpo_without(tiny_model, tmp_path):
    def dpo(kernels: str, out):
        config = make_config(tiny_model, out, steps=6, every_save=1000, kernels=kernels)
        config.spec.objective = "dpo"
        config.spec.dataset.format = "preference"
        config.spec.dataset.uri = f"file://{REPO}/examples/data/support-preferences.jsonl"
        assert train.run_training(config) == 0
        return losses(out)

    assert dpo("auto", tmp_path / "auto") == pytest.approx(dpo("none", tmp_path / "none"), rel=1e-4, abs=1e-5)


def test_compile_always_on_cpu_with_checkpointing_logs_the_compile_time(tiny_model, tmp_path, capsys):
    report = trained(tiny_model, tmp_path / "compiled", steps=3, compile="always", gradientCheckpointing=True)
    assert report["kernels"]["compiledLayers"] == 2
    assert report["kernels"]["firstStepSeconds"] > 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    compiled = [line for line in lines if line.get("event") == "compiled"]
    assert compiled and compiled[0]["layers"] == 2 and compiled[0]["first_step_seconds"] > 0
    eager = trained(tiny_model, tmp_path / "eager", steps=3, gradientCheckpointing=True)
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    assert eager["kernels"]["compiledLayers"] == 0  # auto does not compile on CPU


def test_under_zero3_the_weights_a_kernel_reads_are_not_gathered_so_nothing_is_patched(tiny_model, tmp_path):
    from kubetune_trainer import methods

    spec = make_config(tiny_model, tmp_path).spec
    model = methods.apply_method(methods.load_base_model(tiny_model, spec, on_gpu=False), spec, 10, tiny_model)
    report = acceleration.accelerate(model, spec, torch.device("cpu"), "deepspeed-zero3")
    assert report.patched == []
    assert [line.split(":")[0] for line in report.fallbacks] == ["chunked cross-entropy", "LoRA kernels"]
    assert all("ZeRO-3" in line for line in report.fallbacks)
    assert not [name for name, module in model.named_modules() if "forward" in vars(module)]


def test_a_patched_decoder_layer_compiles_as_one_graph(tiny_model, tmp_path):
    """Regional compilation pays only if the fused LoRA MLP, QKV and linear Functions trace: no graph breaks."""
    run = train.setup(make_config(tiny_model, tmp_path), DistEnv(0, 1, 0))
    lm = acceleration.causal_lm(run.model)
    assert "fused LoRA QKV x2" in run.accelerated.patched
    layer, hidden = lm.model.layers[0], torch.randn(2, 16, 64, requires_grad=True)
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    embeddings = lm.model.rotary_emb(hidden, positions)
    run.model.train()
    explained = torch._dynamo.explain(layer)(hidden, position_ids=positions, position_embeddings=embeddings)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
