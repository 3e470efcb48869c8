"""LoRA+ (method.lora.loraplusLrRatio): the optimizer gets the B matrices in a group of their own
at learningRate x ratio, everything else trainable at learningRate; without it, one group."""

import warnings

import pytest
import torch

from kubetune.api.finetunejob import MethodSpec

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_lora_model(method: MethodSpec):
    from kubetune_trainer.methods import peft_config

    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
        return peft.get_peft_model(model, peft_config(method, total_steps=10, tokenizer_dir=None))


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_b_matrices_get_the_ratio(kind):
    from kubetune_trainer.methods import parameter_groups

    method = MethodSpec.model_validate({"type": kind, "lora": {"r": 4, "loraplusLrRatio": 16}})
    model = tiny_lora_model(method)
    slow, fast = parameter_groups(model, trainable(model), method, 2e-4)
    assert slow["lr"] == 2e-4 and fast["lr"] == pytest.approx(3.2e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    assert fast["params"] and all(".lora_B." in names[id(p)] for p in fast["params"])
    assert slow["params"] and not any(".lora_B." in names[id(p)] for p in slow["params"])
    assert len(slow["params"]) + len(fast["params"]) == len(trainable(model))
    if kind == "dora":  # the magnitude vectors learn at the base rate, with A
        assert any("lora_magnitude_vector" in names[id(p)] for p in slow["params"])
    optimizer = torch.optim.AdamW([slow, fast], lr=2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, pytest.approx(3.2e-3)]


@pytest.mark.parametrize("raw", [{"type": "lora"}, {"type": "loha"}])
def test_without_the_ratio_the_parameters_pass_unchanged(raw):
    from kubetune_trainer.methods import parameter_groups

    method = MethodSpec.model_validate(raw)
    model = tiny_lora_model(method)
    parameters = trainable(model)
    assert parameter_groups(model, parameters, method, 2e-4) is parameters


def test_the_ratio_with_no_b_matrix_in_the_optimizer_is_an_error():
    from kubetune_trainer.methods import parameter_groups

    method = MethodSpec.model_validate({"type": "lora", "lora": {"r": 4, "loraplusLrRatio": 4}})
    model = tiny_lora_model(method)
    only_a = [p for n, p in model.named_parameters() if ".lora_A." in n]
    with pytest.raises(ValueError, match="loraplusLrRatio: the adapter has no LoRA B matrices"):
        parameter_groups(model, only_a, method, 2e-4)
