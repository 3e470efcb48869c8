"""LoRA initialisations: PiSSA and OLoRA train on a base they changed (part of each weight moved into
the adapter), so the trainer saves an ordinary LoRA adapter of rank 2r for the unchanged base; it
reloads on the original base model and computes what the trained model computes."""

import json

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: trainer tier needs the [trainer] extra (make setup)")

from kubetune_trainer import methods, train  # noqa: E402
from kubetune_trainer.distributed import DistEnv  # noqa: E402
from tests.trainer.support import make_config  # noqa: E402

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


@pytest.mark.parametrize("rslora", [False, True])
def test_the_conversion_gives_the_trained_update_on_the_unchanged_base(rslora):
    torch.manual_seed(0)
    r, alpha, d_in, d_out = 3, 6, 8, 5
    a0, b0 = torch.randn(r, d_in), torch.randn(d_out, r)  # what the init moved out of W
    a, b = a0 + 0.1 * torch.randn(r, d_in), b0 + 0.1 * torch.randn(d_out, r)  # after training
    w = torch.randn(d_out, d_in)

    def scale(rank, numerator):
        return numerator / (rank**0.5 if rslora else rank)

    tuned = (w - scale(r, alpha) * b0 @ a0) + scale(r, alpha) * b @ a  # what training computed
    config = {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "init_lora_weights": "pissa_niter_16"}
    converted, state = methods.to_plain_lora(config, {A: a, B: b}, {A: a0, B: b0})
    assert converted["r"] == 2 * r and converted["init_lora_weights"] is True
    assert state[A].shape == (2 * r, d_in) and state[B].shape == (d_out, 2 * r)
    plain = w + scale(converted["r"], converted["lora_alpha"]) * state[B] @ state[A]
    assert torch.allclose(plain, tuned, atol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_changing_init_saves_an_adapter_for_the_original_base(init, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    method = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "init": init}}
    config = make_config(tiny_model, tmp_path, steps=4, method=method, every_save=1000, learningRate="5e-3")
    run = train.setup(config, DistEnv(0, 1, 0))
    assert run.initial_adapter is not None and any(t.abs().sum() > 0 for t in run.initial_adapter.values())
    train.fit(run)
    train.save_outputs(run)
    adapter = tmp_path / "output" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True

    batch = {"input_ids": torch.tensor([run.train_set[0].input_ids])}
    run.model.eval()
    with torch.no_grad():
        expected = run.model(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        plain = base(**batch).logits
        reloaded = PeftModel.from_pretrained(base, adapter).eval()
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-4), init
    assert not torch.allclose(plain, expected, atol=1e-3), "training changed nothing"


def test_the_default_and_gaussian_inits_save_the_adapter_as_trained(tiny_model, tmp_path):
    method = {"type": "lora", "lora": {"r": 4, "alpha": 8, "init": "gaussian"}}
    config = make_config(tiny_model, tmp_path, steps=2, method=method, every_save=1000)
    run = train.setup(config, DistEnv(0, 1, 0))
    assert run.initial_adapter is None
    train.fit(run)
    train.save_outputs(run)
    saved = json.loads((tmp_path / "output" / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["init_lora_weights"] == "gaussian"
