"""Run Liger Kernel's Triton kernels in Triton's interpreter on CPU tensors; print a JSON report.

Not a test module (pytest does not collect it): tests/kernels/test_liger.py runs it in a
subprocess with ``TRITON_INTERPRET=1``, which Triton reads when it is first imported, and judges
the errors it reports against tolerances written in the test.

For every op and dtype it reports, per output and per gradient, the largest absolute error
against a float64 torch reference computed from the same (rounded) inputs, and the largest
magnitude of the reference, so the test can apply ``atol + rtol * scale``. It also counts which
Triton kernels the interpreter launched, so a silent torch fallback inside Liger cannot pass for
a kernel check.

Two shims make Liger 0.8.5 runnable under the interpreter of Triton 3.9; both are reported in
the JSON and neither touches a kernel's code:

* ``float_scalar_args``: the interpreter passes Python float kernel arguments through as Python
  floats (its ``_implicit_cvt`` wraps bools, ints and pointers only), while compiled Triton
  specialises them to fp32 scalars. Liger's RMSNorm (``eps.to(tl.float32)``) and SwiGLU
  (``gate_multiplier.to(tl.float32)``) kernels then fail with "'float' object has no attribute
  'to'". The shim wraps floats as fp32 scalars, as the compiler does.
* ``libdevice_rsqrt``: RMSNorm imports ``rsqrt`` from ``triton.language.extra.libdevice``, whose
  functions are stubs the compiler links to CUDA's libdevice; the interpreter cannot run
  extern functions (the stub returns None: "cannot convert None ... to tensor"). The shim points
  that one name at ``tl.rsqrt``, which the interpreter evaluates with numpy.

Usage: ``TRITON_INTERPRET=1 python tests/kernels/liger_interpreter_check.py``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
import traceback

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("set TRITON_INTERPRET=1 before running this check (Triton reads it at import time)")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Odd shapes: 9 x 7 tokens, hidden 41, vocabulary 37. RoPE needs an even head dim (it rotates
# halves): 14, i.e. 7 rotated pairs, with 5 query heads and 1 key/value head.
BATCH, SEQ, HIDDEN, VOCAB = 9, 7, 41, 37
Q_HEADS, KV_HEADS, HEAD_DIM = 5, 1, 14

launches: collections.Counter = collections.Counter()


def install_shims() -> list[str]:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    implicit_cvt = interpreter._implicit_cvt

    def implicit_cvt_with_floats(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return implicit_cvt(arg)

    interpreter._implicit_cvt = implicit_cvt_with_floats

    import liger_kernel.ops.rms_norm as rms_norm_ops

    rms_norm_ops.rsqrt = lambda x: tl.rsqrt(x)  # resolved when called, inside the interpreter's patched tl
    return ["float_scalar_args", "libdevice_rsqrt"]


def count_launches() -> None:
    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return call(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counted


def leaf(shape, dtype, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype).requires_grad_()


def as_float64(tensor):
    """A float64 leaf copy for the reference, taken before a kernel may reuse the input's storage."""
    return tensor.detach().double().clone().requires_grad_()


def errors(got: dict, want: dict) -> dict:
    """Per name: [max |got - want|, max |want|], both as float64."""
    out = {}
    for name, reference in want.items():
        value = got[name]
        if value is None:
            out[name] = None
            continue
        out[name] = [
            (value.detach().double() - reference.detach()).abs().max().item(),
            reference.detach().abs().max().item(),
        ]
    return out


def check_rms_norm(dtype, generator):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    eps = 1e-6
    x = leaf((BATCH, SEQ, HIDDEN), dtype, generator)
    w = leaf((HIDDEN,), dtype, generator)
    x64, w64 = as_float64(x), as_float64(w)
    # in_place=False: the default overwrites dY in backward, which would corrupt the cotangent
    # the reference reuses below.
    y = LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
    cotangent = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    (y.double() * cotangent).sum().backward()

    y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    (y64 * cotangent).sum().backward()
    return errors({"out": y, "grad_x": x.grad, "grad_w": w.grad}, {"out": y64, "grad_x": x64.grad, "grad_w": w64.grad})


def check_swiglu(dtype, generator):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    a = leaf((BATCH, SEQ, HIDDEN), dtype, generator)
    b = leaf((BATCH, SEQ, HIDDEN), dtype, generator)
    a64, b64 = as_float64(a), as_float64(b)  # before the call: Liger's backward reuses a's and b's storage
    c = LigerSiLUMulFunction.apply(a, b)
    cotangent = torch.randn(c.shape, generator=generator, dtype=torch.float64)
    (c.double() * cotangent).sum().backward()

    c64 = F.silu(a64) * b64
    (c64 * cotangent).sum().backward()
    return errors({"out": c, "grad_a": a.grad, "grad_b": b.grad}, {"out": c64, "grad_a": a64.grad, "grad_b": b64.grad})


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def check_rope(dtype, generator):
    from liger_kernel.ops.rope import LigerRopeFunction

    q = leaf((BATCH, Q_HEADS, SEQ, HEAD_DIM), dtype, generator)
    k = leaf((BATCH, KV_HEADS, SEQ, HEAD_DIM), dtype, generator)
    # As transformers builds them: one angle per rotated pair, duplicated across the halves.
    angles = torch.rand((1, SEQ, HEAD_DIM // 2), generator=generator, dtype=torch.float64) * 6.0
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(dtype)
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1).to(dtype)
    q64, k64 = as_float64(q), as_float64(k)  # before the call: Liger rotates q and k in place
    q_out, k_out = LigerRopeFunction.apply(q.clone(), k.clone(), cos, sin)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (q_out, k_out)]
    sum((t.double() * g).sum() for t, g in zip((q_out, k_out), cotangents, strict=True)).backward()

    cos64, sin64 = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    q64_out = q64 * cos64 + rotate_half(q64) * sin64
    k64_out = k64 * cos64 + rotate_half(k64) * sin64
    sum((t * g).sum() for t, g in zip((q64_out, k64_out), cotangents, strict=True)).backward()
    return errors(
        {"q": q_out, "k": k_out, "grad_q": q.grad, "grad_k": k.grad},
        {"q": q64_out, "k": k64_out, "grad_q": q64.grad, "grad_k": k64.grad},
    )


def check_linear_cross_entropy(dtype, generator):
    """kubetune's wrapper around Liger's fused linear cross-entropy, with a bias and ignored labels."""
    from kubetune_kernels.liger import liger_linear_cross_entropy

    hidden = leaf((BATCH, SEQ, HIDDEN), dtype, generator)
    weight = leaf((VOCAB, HIDDEN), dtype, generator, scale=0.3)
    bias = leaf((VOCAB,), dtype, generator, scale=0.3)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels[:, :3] = -100  # a masked prompt
    h64, w64, b64 = (as_float64(t) for t in (hidden, weight, bias))
    loss = liger_linear_cross_entropy(hidden, weight, labels, bias=bias)
    # A cotangent other than 1 exercises Liger's backward scaling kernel.
    (loss * 0.5).backward()

    loss64 = F.cross_entropy((h64 @ w64.T + b64).reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    (loss64 * 0.5).backward()
    return {
        "loss_dtype": str(loss.dtype),
        **errors(
            {"loss": loss, "grad_hidden": hidden.grad, "grad_weight": weight.grad, "grad_bias": bias.grad},
            {"loss": loss64, "grad_hidden": h64.grad, "grad_weight": w64.grad, "grad_bias": b64.grad},
        ),
    }


CHECKS = {
    "rms_norm": check_rms_norm,
    "swiglu": check_swiglu,
    "rope": check_rope,
    "linear_cross_entropy": check_linear_cross_entropy,
}


def run_check(check, dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    before = launches.copy()
    started = time.perf_counter()
    try:
        result = {"errors": check(dtype, generator)}
    except Exception as exc:  # noqa: BLE001 - the report carries the exact failure to the test
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        cause = exc.__cause__ or exc
        result = {"failure": f"{type(exc).__name__}: {exc} (cause: {type(cause).__name__}: {cause}; at {where})"}
    result["kernels"] = dict(launches - before)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def probe_bf16_arithmetic() -> dict:
    """Does the interpreter multiply two bf16 values correctly, and via fp32?

    Triton 3.9's interpreter stores bf16 as numpy uint16 and converts it correctly only on an
    explicit ``.to(tl.float32)``; arithmetic directly on bf16 operands works on the raw bits.
    Kernels that compute in bf16 (Liger's RoPE, SwiGLU, RMSNorm's weight gradient) therefore give
    garbage there, which says nothing about the kernels on a GPU.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def multiply(x_ptr, y_ptr, direct_ptr, via_fp32_ptr, N: tl.constexpr):
        offsets = tl.arange(0, N)
        x = tl.load(x_ptr + offsets)
        y = tl.load(y_ptr + offsets)
        tl.store(direct_ptr + offsets, x * y)
        tl.store(via_fp32_ptr + offsets, (x.to(tl.float32) * y.to(tl.float32)).to(tl.bfloat16))

    x = torch.tensor([1.5, 2.0, -3.0, 0.25], dtype=torch.bfloat16)
    y = torch.tensor([2.0, 0.5, 1.0, 4.0], dtype=torch.bfloat16)
    direct, via_fp32 = torch.empty_like(x), torch.empty_like(x)
    multiply[(1,)](x, y, direct, via_fp32, N=4)
    want = x * y
    return {"direct": bool(torch.equal(direct, want)), "via_fp32": bool(torch.equal(via_fp32, want))}


def check_model_patch() -> dict:
    """apply_liger on a tiny Llama (fp32, CPU, interpreted) against an eager copy of it.

    Reports the patched names, the largest logit and gradient differences, and whether a model
    built afterwards, and transformers' modeling module, were left untouched.
    """
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from kubetune_kernels.liger import apply_liger

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=40,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    eager = LlamaForCausalLM(config).float()
    patched = copy.deepcopy(eager)
    module_before = dict(vars(modeling_llama))
    names = apply_liger(patched, rms_norm=True, rope=True, swiglu=True, interpret_ok=True)
    names_again = apply_liger(patched, rms_norm=True, rope=True, swiglu=True, interpret_ok=True)
    module_changed = sorted(k for k, v in vars(modeling_llama).items() if module_before.get(k) is not v)
    bystander = LlamaForCausalLM(config)
    bystander_patched = sorted(
        {
            type(m).__name__
            for m in bystander.modules()
            if "forward" in m.__dict__ or type(m).__module__.startswith("liger_kernel")
        }
    )

    input_ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    launches_before = launches.copy()
    results = {}
    for name, model in (("eager", eager), ("patched", patched)):
        out = model(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results[name] = (out.logits.detach(), out.loss.detach(), grads)
    (logits, loss, grads), (logits_p, loss_p, grads_p) = results["eager"], results["patched"]
    return {
        "patched": names,
        "patched_again": names_again,
        "module_changed": module_changed,
        "bystander_patched": bystander_patched,
        "kernels": dict(launches - launches_before),
        "logits": [(logits_p - logits).abs().max().item(), logits.abs().max().item()],
        "loss": [(loss_p - loss).abs().item(), loss.abs().item()],
        "grads": [
            max((grads_p[n] - g).abs().max().item() for n, g in grads.items()),
            max(g.abs().max().item() for g in grads.values()),
        ],
    }


def run_guarded(function) -> dict:
    started = time.perf_counter()
    try:
        result = function()
    except Exception as exc:  # noqa: BLE001 - the report carries the exact failure to the test
        result = {"failure": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def main() -> None:
    count_launches()
    # First without the shims, to record why they are needed (the test asserts these still fail,
    # so a Triton or Liger release that fixes them is noticed and the shims can go).
    report = {"unshimmed": {op: run_check(CHECKS[op], torch.float32) for op in ("rms_norm", "swiglu")}}
    report["shims"] = install_shims()
    report["bf16_arithmetic"] = run_guarded(probe_bf16_arithmetic)
    report["ops"] = {}
    for op, check in CHECKS.items():
        report["ops"][op] = {name: run_check(check, dtype) for name, dtype in DTYPES.items()}
    report["model"] = run_guarded(check_model_patch)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
