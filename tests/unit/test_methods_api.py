"""The adapter methods in the API: loha, lokr, vera, oft, hra, fourierft and lnTuning each with its
own typed settings block and rules, LoRA+ as a LoRA option, the same words from Python and from CEL,
and `kubectl explain` telling when to pick each method."""

import cel
import pytest
from pydantic import ValidationError

from kubetune.api import FineTuneJobSpec
from kubetune.api.finetunejob import (
    FourierFtSettings,
    HraSettings,
    LnTuningSettings,
    LohaSettings,
    LokrSettings,
    LoraSettings,
    MethodSpec,
    OftSettings,
    VeraSettings,
)
from tests.unit.support import spec

BLOCKS = {
    "loha": ("loha", LohaSettings),
    "lokr": ("lokr", LokrSettings),
    "vera": ("vera", VeraSettings),
    "oft": ("oft", OftSettings),
    "hra": ("hra", HraSettings),
    "fourierft": ("fourierft", FourierFtSettings),
    "lnTuning": ("lnTuning", LnTuningSettings),
}


def error_text(raw: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        FineTuneJobSpec.model_validate(raw)
    return str(caught.value)


@pytest.mark.parametrize("method", BLOCKS)
def test_each_method_takes_its_own_block(method):
    block, model = BLOCKS[method]
    parsed = FineTuneJobSpec.model_validate(spec(**{"method.type": method, f"method.{block}": {}}))
    assert isinstance(getattr(parsed.method, _snake(block)), model)


@pytest.mark.parametrize("method", BLOCKS)
def test_a_block_is_refused_with_another_method(method):
    block, _ = BLOCKS[method]
    other = "lora" if method != "loha" else "lokr"
    assert f"method.{block} is only allowed with method.type {method}" in error_text(
        spec(**{"method.type": other, f"method.{block}": {}})
    )


def test_lora_blocks_stay_lora_only():
    assert "method.lora is only allowed" in error_text(spec(**{"method.type": "loha", "method.lora": {"r": 8}}))
    assert "method.quantization is only allowed with method.type qlora" in error_text(
        spec(**{"method.type": "oft", "method.quantization": {"bits": 4}})
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method.type": "hra", "method.hra": {"r": 7}}, "method.hra.r must be even"),
        ({"method.type": "lokr", "method.lokr": {"decomposeFactor": 0}}, "decomposeFactor must be -1"),
        ({"method.type": "lokr", "method.lokr": {"decomposeFactor": -2}}, "greater than or equal to -1"),
        (
            {"method.type": "oft", "method.oft": {"targetModules": ["all-linear", "q_proj"]}},
            "method.oft.targetModules: all-linear already covers every linear layer",
        ),
        ({"method.type": "vera", "method.vera": {"r": 0}}, "greater than or equal to 1"),
        ({"method.type": "fourierft", "method.fourierft": {"nFrequency": 0}}, "greater than or equal to 1"),
        ({"method.type": "oft", "method.oft": {"blockSize": 1}}, "greater than or equal to 2"),
        ({"method.type": "lora", "method.lora": {"loraplusLrRatio": 0.5}}, "greater than or equal to 1"),
        ({"method.type": "loha", "method.loha": {"rankDropout": 1.0}}, "less than 1"),
    ],
)
def test_rules_reject_with_their_message(overrides, message):
    assert message in error_text(spec(**overrides))


def test_defaults_are_the_papers_and_pefts():
    method = MethodSpec(type="vera")
    assert method.effective_vera().r == 256 and method.effective_vera().target_modules == ["q_proj", "v_proj"]
    assert method.effective_fourierft().n_frequency == 1000 and method.effective_fourierft().scaling == 150.0
    assert method.effective_oft().block_size == 32
    assert method.effective_ln_tuning().target_modules == ["input_layernorm", "post_attention_layernorm", "norm"]
    assert LoraSettings().loraplus_lr_ratio is None
    parsed = MethodSpec.model_validate({"type": "dora", "lora": {"loraplusLrRatio": 16, "rslora": True}})
    assert parsed.effective_lora().loraplus_lr_ratio == 16 and parsed.effective_lora().rslora


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


BLOCK_CASES = [
    (LohaSettings, {"targetModules": ["all-linear", "q_proj"]}),
    (LohaSettings, {"targetModules": ["q_proj", "v_proj"]}),
    (LokrSettings, {"decomposeFactor": 0}),
    (LokrSettings, {"decomposeFactor": 16, "targetModules": ["all-linear"]}),
    (LokrSettings, {"targetModules": ["all-linear", "o_proj"]}),
    (VeraSettings, {"targetModules": ["q_proj", "all-linear"]}),
    (VeraSettings, {}),
    (OftSettings, {"targetModules": ["all-linear", "k_proj"]}),
    (OftSettings, {"blockShare": True}),
    (HraSettings, {"r": 3}),
    (HraSettings, {"r": 4}),
    (HraSettings, {"r": 4, "targetModules": ["all-linear", "k_proj"]}),
    (FourierFtSettings, {"targetModules": ["all-linear", "up_proj"]}),
    (FourierFtSettings, {"nFrequency": 10}),
]


@pytest.mark.parametrize("model, raw", BLOCK_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_block_cel_and_python_agree(model, raw):
    """What the API server admits (the CEL on the defaulted wire object) is what `kubetune validate`
    admits (the Python twin of each rule, and the model as a whole)."""
    built = model.model_construct(**{_snake(key): value for key, value in raw.items()})
    wire = built.model_dump(by_alias=True)
    assert model.cel_rules
    by_cel = [cel.evaluate(rule.cel, {"self": wire}) is True for rule in model.cel_rules]
    by_python = [rule.check(built) for rule in model.cel_rules]
    assert by_cel == by_python
    try:
        model.model_validate(raw)
        parsed = True
    except ValidationError:
        parsed = False
    assert parsed == all(by_python)


@pytest.mark.parametrize("method", ["lora", *BLOCKS])
@pytest.mark.parametrize("block", [b for b, _ in BLOCKS.values()])
def test_only_with_rules_cel_and_python_agree(method, block):
    raw = {"type": method, block: {}}
    rules = [r for r in MethodSpec.cel_rules if f"method.{block} is only" in r.message]
    assert len(rules) == 1
    by_cel = cel.evaluate(rules[0].cel, {"self": raw}) is True
    try:
        MethodSpec.model_validate(raw)
        parsed = True
    except ValidationError:
        parsed = False
    assert by_cel == parsed == (_owner(block) == method)


def _owner(block: str) -> str:
    return next(method for method, (name, _) in BLOCKS.items() if name == block)


def test_explain_says_when_to_pick_each_method():
    """`kubectl explain finetunejob.spec.method` shows these descriptions: every method is named
    with what it is for, and every new block says when to pick it."""
    described = MethodSpec.model_fields["type"].description
    for method in ("full", "lora", "qlora", "dora", "ia3", "prefixTuning", "promptTuning", "adalora", *BLOCKS):
        assert f"{method}:" in described or f"{method} /" in described or f"/ {method}:" in described, method
    assert "vLLM" in described
    for block, _ in BLOCKS.values():
        assert "pick it" in MethodSpec.model_fields[_snake(block)].description


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_vllm_serves_plain_lora(method):
    assert MethodSpec(type=method).vllm_problem() == ""


@pytest.mark.parametrize("method", ["dora", "ia3", "adalora", "promptTuning", *BLOCKS])
def test_vllm_refuses_every_other_adapter_with_the_reason(method):
    assert MethodSpec(type=method).vllm_problem() == (
        f"runtime vllm serves LoRA adapters (lora, qlora) only, and this is a {method} adapter; use runtime builtin"
    )


def test_vllm_refuses_a_full_fine_tune_as_no_adapter():
    assert "this is a whole model, not an adapter" in MethodSpec(type="full").vllm_problem()


@pytest.mark.parametrize(
    ("method", "modules", "message"),
    [
        ("loha", ["q_prj"], "spec.method.loha.targetModules: unknown module 'q_prj'; did you mean 'q_proj'?"),
        ("vera", ["all-linear", "v_proj"], "spec.method.vera.targetModules: all-linear already covers"),
        ("fourierft", ["qkv"], "spec.method.fourierft.targetModules: unknown module 'qkv'"),
        ("lnTuning", ["q_proj"], "'q_proj' is not a normalisation layer; lnTuning trains layers such as"),
        ("lnTuning", ["input_layernom"], "unknown normalisation layer 'input_layernom'; did you mean"),
    ],
)
def test_module_names_are_checked_for_every_method(method, modules, message):
    from kubetune.api.validation import validate_finetunejob

    block = BLOCKS[method][0]
    raw = spec(**{"method": {"type": method, block: {"targetModules": modules}}})
    try:
        parsed = FineTuneJobSpec.model_validate(raw)
    except ValidationError as refused:  # a CEL-backed rule caught it first (all-linear alone)
        assert message.split(": ", 1)[1] in str(refused)
        return
    problems = [str(p) for p in validate_finetunejob(parsed)]
    assert any(message in p for p in problems), problems


def test_norm_names_of_common_families_are_accepted():
    from kubetune.api.validation import validate_finetunejob

    names = ["input_layernorm", "post_attention_layernorm", "norm", "ln_1", "ln_f", "q_norm"]
    raw = spec(**{"method": {"type": "lnTuning", "lnTuning": {"targetModules": names}}})
    parsed = FineTuneJobSpec.model_validate(raw)
    assert [p for p in validate_finetunejob(parsed) if "lnTuning" in p.path] == []


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "olora"])
def test_base_changing_inits_are_for_lora_only_in_cel_and_python(method, init):
    raw = {"type": method, "lora": {"init": init}}
    [rule] = [r for r in MethodSpec.cel_rules if "lora.init pissa and olora" in r.message]
    by_cel = cel.evaluate(rule.cel, {"self": raw}) is True
    try:
        MethodSpec.model_validate(raw)
        parsed = True
    except ValidationError:
        parsed = False
    assert by_cel == parsed == (method == "lora" or init in ("default", "gaussian"))
