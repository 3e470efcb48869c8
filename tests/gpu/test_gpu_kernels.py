"""On a CUDA GPU: Liger Kernel applied by kubetune gives the eager model's numbers, in bf16.

bf16 results are judged against an fp32/fp64 reference, and Liger must be no further from it
than eager bf16 is (times a small factor): a fixed bf16 tolerance would be either loose enough
to hide a bug or tight enough to fail on rounding. The same kernels are checked in fp32 in
Triton's interpreter on CPU (tests/kernels/test_liger.py).

Reported as NOT RUN on machines without a GPU (see tests/conftest.py).
"""

import copy

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.trainer]

torch = pytest.importorskip("torch", reason="NOT RUN: gpu tier needs the [trainer] extra (make setup)")
pytest.importorskip("liger_kernel", reason="NOT RUN: gpu tier needs liger-kernel (make setup)")

import torch.nn.functional as F  # noqa: E402

from kubetune_kernels import liger  # noqa: E402

# Liger's bf16 error may be this many times eager bf16's, plus an absolute slack for values
# where both are (nearly) exact.
BF16_FACTOR = 2.0
BF16_SLACK = 1e-3
FP32 = {"atol": 1e-4, "rtol": 1e-4}


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=1031,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).cuda()


def max_error(got, want) -> float:
    return (got.detach().double() - want.detach().double()).abs().max().item()


def run(model, input_ids, labels):
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def assert_no_worse_than_eager(name, liger_value, eager_value, reference):
    liger_err, eager_err = max_error(liger_value, reference), max_error(eager_value, reference)
    assert liger_err <= BF16_FACTOR * eager_err + BF16_SLACK * max(1.0, reference.abs().max().item()), (
        f"{name}: Liger bf16 error {liger_err:.3g} vs eager bf16 error {eager_err:.3g}"
    )


def test_liger_can_run_here():
    assert liger.liger_problem(torch.device("cuda")) is None


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_apply_liger_matches_eager_in_bf16(adapter):
    from transformers.models.llama import modeling_llama

    reference = tiny_llama().float()
    eager = copy.deepcopy(reference).to(torch.bfloat16)
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        reference, eager = get_peft_model(reference, lora), get_peft_model(eager, copy.deepcopy(lora))
        eager.load_state_dict(reference.state_dict())  # same LoRA weights, cast to bf16
        eager.to(torch.bfloat16)
    patched = copy.deepcopy(eager)
    module_before = dict(vars(modeling_llama))

    names = liger.apply_liger(patched, rms_norm=True, rope=True, swiglu=adapter == "full")

    expected = ["rms_norm x5", "swiglu x2", "rope x2"] if adapter == "full" else ["rms_norm x5", "rope x2"]
    assert names == expected
    assert dict(vars(modeling_llama)) == module_before
    assert [n for n, m in eager.named_modules() if "forward" in m.__dict__] == []

    generator = torch.Generator(device="cuda").manual_seed(1)
    input_ids = torch.randint(0, 1031, (3, 97), device="cuda", generator=generator)
    labels = input_ids.clone()
    labels[:, :13] = -100
    ref_logits, ref_loss, ref_grads = run(reference, input_ids, labels)
    eager_logits, eager_loss, eager_grads = run(eager, input_ids, labels)
    liger_logits, liger_loss, liger_grads = run(patched, input_ids, labels)

    assert_no_worse_than_eager("logits", liger_logits, eager_logits, ref_logits)
    assert_no_worse_than_eager("loss", liger_loss, eager_loss, ref_loss)
    assert liger_grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        assert_no_worse_than_eager(f"grad {name}", liger_grads[name], eager_grads[name], want)


def cross_entropy_inputs(dtype, bias: bool):
    generator = torch.Generator(device="cuda").manual_seed(2)

    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, device="cuda", generator=generator) * scale).to(dtype).requires_grad_()

    hidden, weight = leaf(3, 37, 256), leaf(1031, 256, scale=0.05)
    bias_ = leaf(1031, scale=0.05) if bias else None
    labels = torch.randint(0, 1031, (3, 37), device="cuda", generator=generator)
    labels[:, :5] = -100
    return hidden, weight, bias_, labels


def plain_loss(hidden, weight, bias, labels, logits_dtype=torch.float32):
    logits = F.linear(hidden, weight, bias).to(logits_dtype)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def grads_of(loss, tensors):
    (loss * 0.5).backward()  # a cotangent other than 1, as a mean over tokens would give
    out = [t.grad.detach().clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return [loss.detach(), *out]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_liger_linear_cross_entropy_equals_the_plain_loss(dtype, bias):
    hidden, weight, bias_, labels = cross_entropy_inputs(dtype, bias)
    tensors = [t for t in (hidden, weight, bias_) if t is not None]
    liger_loss = liger.liger_linear_cross_entropy(hidden, weight, labels, bias=bias_)
    assert liger_loss.dtype == torch.float32
    got = grads_of(liger_loss, tensors)
    plain = grads_of(plain_loss(hidden, weight, bias_, labels), tensors)
    reference_inputs = [t.detach().double().requires_grad_() for t in tensors]
    h64, w64, *b64 = reference_inputs
    reference = grads_of(plain_loss(h64, w64, b64[0] if b64 else None, labels, torch.float64), reference_inputs)
    names = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
    for name, value, eager_value, want in zip(names, got, plain, reference, strict=False):
        if dtype == torch.float32:
            bound = FP32["atol"] + FP32["rtol"] * want.abs().max().item()
            assert max_error(value, want) <= bound, f"{name}: {max_error(value, want):.3g} > {bound:.3g}"
        else:
            assert_no_worse_than_eager(name, value, eager_value, want)


def test_liger_linear_cross_entropy_with_every_label_ignored_is_zero():
    hidden, weight, _, labels = cross_entropy_inputs(torch.bfloat16, bias=False)
    loss = liger.liger_linear_cross_entropy(hidden, weight, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().max().item() == 0.0
