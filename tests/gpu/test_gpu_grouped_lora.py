"""On a CUDA GPU: the grouped-LoRA Triton kernels against the torch reference and a float64 loop.

The same odd-shaped problem as tests/kernels/test_grouped_lora.py (which checks the kernels in
Triton's interpreter on CPU), moved to the GPU, in fp32, bf16 and fp16, plus a serving-sized
layer (1024 -> 1024 with rank-16 adapters, 16 slots, rows round-robin). On a GPU both paths round
to nearest, so the kernel is held to the reference's tolerance, not the interpreter's.

Reported as NOT RUN on machines without a GPU (see tests/conftest.py).
"""

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.trainer]

torch = pytest.importorskip("torch", reason="NOT RUN: gpu tier needs the [trainer] extra (make setup)")

from kubetune_kernels import grouped_lora as gl  # noqa: E402
from tests.kernels.grouped_lora_interpreter_check import (  # noqa: E402
    CONFIGS,
    OUT,
    TOKENS,
    error,
    loop_delta,
    make_problem,
    without_adapter,
)
from tests.kernels.test_grouped_lora import TOLERANCES, over_tolerance, x_dtype_name  # noqa: E402


def to_cuda(stack: gl.AdapterStack) -> gl.AdapterStack:
    return gl.AdapterStack(stack.a.cuda(), stack.b.cuda(), stack.scale.cuda())


def test_triton_runs_on_this_gpu():
    assert gl.triton_problem("cuda") is None


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_triton_kernel_on_cuda_matches_float64_loop_and_reference(config):
    x, stack, index, live = make_problem(*CONFIGS[config])
    want = loop_delta(x, index, live)
    stack_cuda = to_cuda(stack)
    with torch.inference_mode():
        got = gl.grouped_lora_triton(x.cuda(), stack_cuda, index.cuda())
        dispatched = gl.grouped_lora(x.cuda(), stack_cuda, index.cuda())
        reference = gl.grouped_lora_reference(x.cuda(), stack_cuda, index.cuda())
    assert got.dtype == x.dtype and got.shape == (TOKENS, OUT)
    dtype = x_dtype_name(config)
    for name, value in (("triton", got), ("reference", reference)):
        pair = error(value.cpu(), want)
        assert not over_tolerance(pair, dtype), (name, config, pair, TOLERANCES[dtype])
    assert torch.equal(dispatched, got)  # grouped_lora takes the kernel on CUDA
    assert (got.cpu()[without_adapter(index, live)] == 0).all()


# The serving-sized layer sums 1024 products per shrink: fp32 gets room for that; bf16 and fp16
# are still one rounding of a float32 sum.
SERVING_TOLERANCES = {**TOLERANCES, "float32": {"atol": 1e-5, "rtol": 1e-5}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [8, 8 * 64])
def test_triton_kernel_on_a_serving_sized_layer(dtype, tokens):
    """1024 -> 1024, rank 16, 16 adapters round-robin and one row in eight without an adapter."""
    generator = torch.Generator().manual_seed(0)
    stack = gl.AdapterStack.empty(16, 16, 1024, 1024, dtype, "cuda")
    for slot in range(16):
        a = torch.randn(16, 1024, generator=generator) / 32
        stack.put(slot, a.cuda(), torch.randn(1024, 16, generator=generator).cuda(), 2.0)
    x = torch.randn(tokens, 1024, generator=generator).to(dtype).cuda()
    index = torch.arange(tokens, device="cuda") % 16
    index[::8] = -1
    with torch.inference_mode():
        got = gl.grouped_lora_triton(x, stack, index)
        reference = gl.grouped_lora_reference(x, stack, index)
    slot = index.clamp(min=0)
    s64 = torch.einsum("ti,tri->tr", x.double(), stack.a.double()[slot]) * 2.0
    want = torch.einsum("tr,tor->to", s64, stack.b.double()[slot]) * (index >= 0).double().unsqueeze(-1)
    name = str(dtype).removeprefix("torch.")
    for label, value in (("triton", got), ("reference", reference)):
        pair = error(value, want)
        assert not over_tolerance(pair, name, SERVING_TOLERANCES), (label, pair, SERVING_TOLERANCES[name])
    assert (got[::8] == 0).all()


def test_grouped_lora_falls_back_to_torch_once_the_kernel_fails_on_a_device(monkeypatch, caplog):
    x, stack, index, _ = make_problem(torch.bfloat16, torch.bfloat16)
    x, stack, index = x.cuda(), to_cuda(stack), index.cuda()
    device = x.device
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(gl, "grouped_lora_triton", broken)
    monkeypatch.setattr(gl, "_FAILED", {})
    with torch.inference_mode():
        first = gl.grouped_lora(x, stack, index)
        second = gl.grouped_lora(x, stack, index)
        reference = gl.grouped_lora_reference(x, stack, index)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    assert len(calls) == 1  # the device is not tried again
    assert gl.triton_problem(device) == "kernel failed: RuntimeError: no C compiler"
    assert "falls back to torch: kernel failed: RuntimeError: no C compiler" in caplog.text
