"""Liger Kernel in kubetune: when it may run, what it patches, and its kernels in Triton's interpreter.

On a machine without a GPU, Liger's Triton kernels run on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, read when Triton is imported, hence one subprocess for the whole file:
tests/kernels/liger_interpreter_check.py) and are compared with float64 torch references on odd
shapes, forward and gradients. The GPU side is tests/gpu/test_gpu_kernels.py.
"""

from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: kernel tests need the [trainer] extra (make setup)")
pytest.importorskip("liger_kernel", reason="NOT RUN: kernel tests need liger-kernel (make setup)")

from kubetune_kernels import liger  # noqa: E402
from tests.kernels.support import run_in_interpreter  # noqa: E402

CHECK_SCRIPT = Path(__file__).with_name("liger_interpreter_check.py")

# |got - float64 reference| <= atol + rtol * max|reference|, per tensor.
TOLERANCES = {
    "float32": {"atol": 2e-6, "rtol": 2e-6},
    # Two bf16 epsilons (2**-7) of the largest value: outputs and gradients are stored in bf16.
    "bfloat16": {"atol": 1e-2, "rtol": 1.6e-2},
}
# The Triton kernels each op must have launched: a torch fallback inside Liger is not a kernel check.
KERNELS = {
    "rms_norm": {"_rms_norm_forward_kernel", "_rms_norm_backward_kernel"},
    "swiglu": {"_swiglu_forward_kernel", "_swiglu_backward_kernel"},
    "rope": {"_triton_rope"},
    "linear_cross_entropy": {"liger_cross_entropy_kernel", "element_mul_kernel"},
}
# Kernels that compute on bf16 operands without first casting to fp32 (see probe_bf16_arithmetic
# in the check script); Liger's cross-entropy kernel casts the logits to fp32 and so runs in bf16.
BF16_ARITHMETIC_OPS = {"rms_norm", "swiglu", "rope"}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The check script's JSON report (one subprocess, about 30 s on two cores)."""
    return run_in_interpreter(CHECK_SCRIPT, tmp_path_factory.mktemp("liger"))


def within(errors: dict, dtype: str) -> dict:
    """The tensors whose error is over tolerance (or not finite), with their error and scale."""
    tol = TOLERANCES[dtype]
    bad = {}
    for name, pair in errors.items():
        if not isinstance(pair, list):
            continue
        err, scale = pair
        if not (err == err and err <= tol["atol"] + tol["rtol"] * scale):  # err == err is False for NaN
            bad[name] = pair
    return bad


# --- when Liger may run -------------------------------------------------------------------------


def test_liger_problem_names_the_missing_device():
    assert liger.liger_problem(torch.device("cpu")) == "no CUDA device"
    assert liger.liger_problem("meta") == "meta device, Liger needs CUDA"
    assert liger.liger_problem("not-a-device").startswith("not a device:")
    if not torch.cuda.is_available():
        assert liger.liger_problem("cuda") == "CUDA not available to torch"


def test_liger_problem_accepts_the_interpreter_only_when_asked(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert liger.liger_problem("cpu", interpret_ok=True) is None
    assert liger.liger_problem("cpu") == "no CUDA device"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert liger.liger_problem("cpu", interpret_ok=True) == "no CUDA device"


def tiny_config(model_type: str = "llama"):
    from transformers import AutoConfig

    sizes = {"vocab_size": 37, "hidden_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4}
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=37, n_embd=40, n_layer=2, n_head=4, n_positions=32)
    return AutoConfig.for_model(model_type, intermediate_size=56, num_key_value_heads=2, **sizes)


def test_liger_model_problem_names_the_architecture():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert liger.liger_model_problem(llama) is None
    lora = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert liger.liger_model_problem(lora) is None  # judged by the base model under PEFT
    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    problem = liger.liger_model_problem(gpt2)
    assert "'gpt2'" in problem and "llama" in problem
    assert liger.liger_model_problem(torch.nn.Linear(3, 3)) == "Linear has no config.model_type"
    assert liger.apply_liger(gpt2) == []


def test_apply_liger_refuses_a_cpu_model_and_changes_nothing():
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    module_before = dict(vars(modeling_llama))
    assert liger.apply_liger(model, swiglu=True) == []
    assert [name for name, module in model.named_modules() if "forward" in module.__dict__] == []
    assert dict(vars(modeling_llama)) == module_before


def test_linear_cross_entropy_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="do not match"):
        liger.liger_linear_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long))


# --- Liger's kernels in Triton's interpreter ---------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(TOLERANCES))
@pytest.mark.parametrize("op", sorted(KERNELS))
def test_liger_kernel_in_interpreter_matches_float64(interpreted, op, dtype):
    if dtype == "bfloat16" and op in BF16_ARITHMETIC_OPS and not interpreted["bf16_arithmetic"].get("direct"):
        pytest.skip(
            f"NOT RUN: Liger's {op} kernel computes on bf16 operands, and Triton's interpreter stores bf16 "
            "as uint16 and multiplies the raw bits (bf16*bf16 is wrong there, bf16->fp32 casts are right); "
            "the bf16 check of this kernel is a GPU test"
        )
    result = interpreted["ops"][op][dtype]
    assert "failure" not in result, result["failure"]
    assert KERNELS[op] <= set(result["kernels"]), result["kernels"]
    assert within(result["errors"], dtype) == {}, (TOLERANCES[dtype], result["errors"])
    if op == "linear_cross_entropy":
        assert result["errors"]["loss_dtype"] == "torch.float32"


def test_interpreter_shims_are_still_needed(interpreted):
    """The check script wraps float kernel arguments and swaps libdevice's rsqrt; see its docstring.

    When this fails, Triton's interpreter (or Liger) no longer needs the float shim: drop it.
    """
    assert interpreted["shims"] == ["float_scalar_args", "libdevice_rsqrt"]
    for op in ("rms_norm", "swiglu"):
        assert "'float' object has no attribute 'to'" in interpreted["unshimmed"][op].get("failure", ""), op
    assert interpreted["bf16_arithmetic"]["via_fp32"] is True


def test_apply_liger_in_interpreter_patches_only_that_instance(interpreted):
    """A tiny fp32 Llama patched with RMSNorm, RoPE and SwiGLU equals its eager copy; nothing else changes."""
    model = interpreted["model"]
    assert "failure" not in model, model["failure"]
    assert model["patched"] == ["rms_norm x5", "swiglu x2", "rope x2"]
    assert model["patched_again"] == model["patched"]  # a second call is harmless and says the same
    assert model["module_changed"] == []  # transformers' modeling_llama as before
    assert model["bystander_patched"] == []  # a Llama built afterwards is all eager
    assert {"_rms_norm_forward_kernel", "_rms_norm_backward_kernel", "_swiglu_forward_kernel", "_triton_rope"} <= set(
        model["kernels"]
    )
    assert within({k: model[k] for k in ("logits", "loss", "grads")}, "float32") == {}, model
