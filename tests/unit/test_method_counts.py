"""The planner's trainable-parameter counts of loha, lokr, vera, oft, hra, fourierft and lnTuning
equal PEFT's own, counted on Llama-shaped models instantiated on the meta device (shapes only, no
memory): Llama-2-7B (multi-head attention) and Llama-3.1-8B (grouped-query attention)."""

import warnings

import pytest
import torch

from kubetune.api.finetunejob import MethodSpec
from kubetune.planning import DecoderShape, factorization, method_trainable_params, nearest_divisor

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000}  # fmt: skip
LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256}  # fmt: skip


def shape_of(config: dict) -> DecoderShape:
    head = config["hidden_size"] // config["num_attention_heads"]
    return DecoderShape(
        config["hidden_size"],
        config["intermediate_size"],
        head * config["num_key_value_heads"],
        config["num_hidden_layers"],
    )


def peft_count(config: dict, method: MethodSpec, monkeypatch) -> int:
    from kubetune_trainer.methods import peft_config

    # FourierFT draws its random frequencies with randperm over in x out entries (17M-45M per layer,
    # tens of seconds for a 7B model); which ones it draws does not change how many there are.
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: torch.arange(n, device=kw.get("device")))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config))
        model = peft.get_peft_model(model, peft_config(method, total_steps=1000, tokenizer_dir=None))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


METHODS = [
    {"type": "loha"},
    {"type": "loha", "loha": {"r": 4, "targetModules": ["q_proj", "down_proj"]}},
    {"type": "lokr"},
    {"type": "lokr", "lokr": {"r": 64}},  # rank beyond half the large factor: that factor is kept whole
    {"type": "lokr", "lokr": {"r": 2, "decomposeBoth": True}},
    {"type": "lokr", "lokr": {"r": 8, "decomposeFactor": 16}},
    {"type": "vera"},
    {"type": "vera", "vera": {"r": 64, "targetModules": ["all-linear"]}},
    {"type": "oft"},
    {"type": "oft", "oft": {"blockSize": 48}},  # divides neither 4096 nor 11008: the nearest divisors
    {"type": "oft", "oft": {"blockSize": 16, "blockShare": True, "targetModules": ["q_proj", "v_proj"]}},
    {"type": "hra"},
    {"type": "hra", "hra": {"r": 16, "targetModules": ["o_proj"]}},
    {"type": "fourierft"},
    {"type": "fourierft", "fourierft": {"nFrequency": 3000, "targetModules": ["all-linear"]}},
    {"type": "lnTuning"},
    {"type": "lnTuning", "lnTuning": {"targetModules": ["input_layernorm"]}},
]


@pytest.mark.parametrize("raw", METHODS, ids=lambda raw: str(raw)[9:70])
def test_counts_equal_pefts_on_llama_7b(raw, monkeypatch):
    method = MethodSpec.model_validate(raw)
    assert method_trainable_params(method, shape_of(LLAMA_7B)) == peft_count(LLAMA_7B, method, monkeypatch)


@pytest.mark.parametrize("raw", [m for m in METHODS if "Modules" not in str(m)], ids=lambda raw: raw["type"])
def test_counts_equal_pefts_with_grouped_query_attention(raw, monkeypatch):
    method = MethodSpec.model_validate(raw)
    assert method_trainable_params(method, shape_of(LLAMA_8B)) == peft_count(LLAMA_8B, method, monkeypatch)


def test_the_counts_are_what_the_methods_promise():
    """Known figures for Llama-2-7B: the orders of magnitude that tell the methods apart."""
    shape = shape_of(LLAMA_7B)
    count = {t: method_trainable_params(MethodSpec(type=t), shape) for t in ("loha", "vera", "fourierft", "lnTuning")}
    assert count == {"loha": 39_976_960, "vera": 278_528, "fourierft": 64_000, "lnTuning": 266_240}


def test_methods_counted_elsewhere_are_not_counted_here():
    assert method_trainable_params(MethodSpec(type="lora"), shape_of(LLAMA_7B)) is None


@pytest.mark.parametrize(
    "dimension, factor, expected",
    [(4096, -1, (64, 64)), (11008, -1, (86, 128)), (128, -1, (8, 16)), (127, -1, (1, 127)), (128, 4, (4, 32)),
     (11008, 48, (43, 256))],
)  # fmt: skip
def test_factorization_is_pefts(dimension, factor, expected):
    from peft.tuners.lokr.layer import factorization as pefts

    assert factorization(dimension, factor) == pefts(dimension, factor) == expected


@pytest.mark.parametrize("size, wanted", [(4096, 48), (11008, 48), (11008, 100), (64, 128), (97, 8)])
def test_nearest_divisor_is_pefts(size, wanted):
    from peft.tuners.oft.layer import OFTLayer

    assert nearest_divisor(size, wanted) == OFTLayer.adjust_oft_parameters(None, size, wanted)
    assert size % nearest_divisor(size, wanted) == 0
