"""On a CUDA GPU: bf16 LoRA and NF4 QLoRA train, the 4-bit base really is 4-bit on the GPU, a
preempted run resumes from its checkpoint, and GPU memory is reported.

Reported as NOT RUN on machines without a GPU (see tests/conftest.py)."""

import json
import math

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.trainer]

torch = pytest.importorskip("torch", reason="NOT RUN: gpu tier needs the [trainer] extra (make setup)")

from kubetune_trainer import train  # noqa: E402
from kubetune_trainer.distributed import DistEnv  # noqa: E402
from tests.trainer.support import adapter_weights, make_config  # noqa: E402

QLORA_NF4 = {
    "type": "qlora",
    "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"},
}


def history_of(out) -> list[dict]:
    return json.loads((out / "output" / "report.json").read_text())["history"]


@pytest.mark.parametrize("method", [{"type": "lora"}, QLORA_NF4], ids=["lora-bf16", "qlora-nf4"])
def test_trains_on_the_gpu_in_bf16(method, tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path, steps=20, method=method, precision="bf16")
    config.spec.resources.gpus_per_node = 1
    assert train.run_training(config) == 0
    history = history_of(tmp_path)
    assert history[-1]["loss"] < history[0]["loss"]
    assert torch.cuda.max_memory_allocated() > 0


def test_qlora_base_weights_are_4_bit_on_the_gpu_and_stay_frozen(tiny_model, tmp_path):
    import bitsandbytes as bnb

    config = make_config(tiny_model, tmp_path, steps=4, method=QLORA_NF4, precision="bf16", every_save=1000)
    run = train.setup(config, DistEnv(0, 1, 0))
    quantized = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers (not the head)
    for module in quantized:
        weight = module.weight
        assert isinstance(weight, bnb.nn.Params4bit) and weight.device.type == "cuda"
        assert weight.dtype == torch.uint8 and weight.numel() * 2 == module.in_features * module.out_features
        assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantization
        assert weight.quant_state.dtype == torch.bfloat16 and not weight.requires_grad
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cuda" and p.dtype == torch.float32 for p in trainable)
    before = [module.weight.detach().clone() for module in quantized]
    run.model.train()
    losses = [train.train_step(run, step)["loss"] for step in range(4)]
    assert all(math.isfinite(loss) for loss in losses), losses
    unchanged = all(torch.equal(old, module.weight) for old, module in zip(before, quantized, strict=True))
    assert unchanged, "the 4-bit base changed"
    assert run.plan.trainable_params < run.plan.total_params


def preempt_at(monkeypatch, step: int) -> None:
    """As if SIGTERM arrived during `step`: the loop checkpoints it and stops (the signal path
    itself is tested on CPU, tests/trainer/test_train.py)."""
    monkeypatch.setattr(train, "_stop_agreed", lambda run: run.state.step == step)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_preempted_gpu_run_resumes_from_its_checkpoint_and_finishes(
    strategy, tiny_model, tmp_path, monkeypatch, capsys
):
    def config_for(out):
        config = make_config(tiny_model, out, steps=20, every_save=1000, precision="bf16")
        config.spec.distributed.strategy = strategy  # fsdp: a one-rank nccl group, DCP checkpoints
        return config

    unbroken = tmp_path / "unbroken"
    assert train.run_training(config_for(unbroken)) == 0

    broken = tmp_path / "broken"
    with monkeypatch.context() as patch:
        preempt_at(patch, 7)
        assert train.run_training(config_for(broken)) == train.EXIT_PREEMPTED
    saved = sorted(p.name for p in (broken / "output" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == ["step-00000007"]
    capsys.readouterr()

    assert train.run_training(config_for(broken)) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"event": "resumed"' in line]
    assert resumed and resumed[0]["step"] == 7
    history, expected = history_of(broken), history_of(unbroken)
    assert [entry["step"] for entry in history] == list(range(1, 21))
    assert all(math.isfinite(entry["loss"]) for entry in history)
    assert history[-1]["loss"] < history[0]["loss"]
    # Exact up to GPU reduction order (bf16 attention backward is not bitwise deterministic).
    assert history[-1]["loss"] == pytest.approx(expected[-1]["loss"], rel=0.02)
    want, got = adapter_weights(unbroken), adapter_weights(broken)
    assert want.keys() == got.keys()
    worst = max(float((want[name] - got[name]).abs().max() / want[name].abs().max().clamp_min(1e-8)) for name in want)
    print(f"resumed vs unbroken adapter ({strategy}): largest relative difference {worst:.2e}")
    assert worst < 0.05


@pytest.mark.parametrize("method", [{"type": "lora"}, QLORA_NF4], ids=["lora-bf16", "qlora-nf4"])
def test_kernels_auto_on_the_gpu_uses_liger_and_compile_and_trains_like_none(method, tiny_model, tmp_path):
    def trained(kernels: str):
        out = tmp_path / kernels
        config = make_config(
            tiny_model, out, steps=12, method=method, precision="bf16", every_save=1000, kernels=kernels
        )
        config.spec.resources.gpus_per_node = 1
        assert train.run_training(config) == 0
        return json.loads((out / "output" / "report.json").read_text())

    auto, none = trained("auto"), trained("none")
    patched = auto["kernels"]["patched"]
    assert "fused linear cross-entropy (Liger)" in patched and any(p.startswith("Liger rms_norm") for p in patched)
    assert "fused LoRA MLP x2" in patched and auto["kernels"]["compiledLayers"] == 2
    assert auto["kernels"]["firstStepSeconds"] > 0
    assert none["kernels"] == {"patched": [], "fallbacks": [], "compiledLayers": 0, "firstStepSeconds": None}
    curve_auto = [entry["loss"] for entry in auto["history"]]
    curve_none = [entry["loss"] for entry in none["history"]]
    assert curve_auto == pytest.approx(curve_none, rel=0.05), (curve_auto, curve_none)


@pytest.mark.parametrize("method", [{"type": "lora"}, QLORA_NF4], ids=["lora-bf16", "qlora-nf4"])
def test_kernels_auto_gives_peft_s_loss_and_adapter_gradients_on_the_gpu(method, tiny_model, tmp_path):
    """One batch, one backward: the fused loss, LoRA Functions (4-bit dequantised on the GPU) and Liger
    against plain PEFT, in bf16; B is randomised first, since PEFT starts it at zero and A's gradient
    would then be zero on both sides whatever the kernel did."""
    from kubetune_trainer.data import collate

    def loss_and_grads(kernels: str):
        config = make_config(tiny_model, tmp_path / kernels, method=method, precision="bf16", kernels=kernels)
        config.spec.resources.gpus_per_node = 1
        run = train.setup(config, DistEnv(0, 1, 0))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, parameter in sorted(run.model.named_parameters()):
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter) * 0.05)
        batch = {k: v.cuda() for k, v in collate(run.train_set[:4], run.tokenizer.pad_token_id).items()}
        run.model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = train.token_loss_sum(run.model, batch)
        loss.backward()
        grads = {n: p.grad.float() for n, p in run.model.named_parameters() if p.requires_grad}
        return loss.item(), grads

    fused_loss, fused = loss_and_grads("auto")
    plain_loss, plain = loss_and_grads("none")
    assert fused_loss == pytest.approx(plain_loss, rel=2e-2)
    for name, grad in plain.items():
        error = (fused[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 5e-2, (name, float(error))
