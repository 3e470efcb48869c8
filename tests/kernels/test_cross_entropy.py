"""The chunked linear cross-entropy and token log-probs against float64 references, and its memory claim.

Shapes are deliberately odd (9x7 tokens, hidden 41, vocabulary 103) and chunk sizes include 1, sizes that do
not divide the 63 tokens, and one larger than all of them, so every edge of the chunk loop is walked.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubetune_kernels import cross_entropy as ce
from kubetune_kernels.cross_entropy import (
    LOGITS_BUDGET_BYTES,
    default_chunk_tokens,
    linear_cross_entropy,
    linear_token_logps,
)

pytestmark = pytest.mark.trainer

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SHAPE, HIDDEN, VOCAB, IGNORE = (9, 7), 41, 103, -100
CHUNKS = [1, 4, 10, 63, 1000]

# fp32: both sides compute the same fp32 matmuls, chunk by chunk or whole; only summation order differs.
FP32_LOSS_RTOL, FP32_GRAD_TOL = 1e-5, 1e-5
# bf16 autocast: the logits are rounded to bf16 (8 bits of mantissa, ~0.4% relative) before the fp32 softmax,
# exactly as the model's lm_head would round them; against float64 that is the error we must allow.
BF16_LOSS_RTOL, BF16_GRAD_TOL = 2e-2, 3e-2
# ...but against torch's own autocast computation the only difference is chunking and the order of sums.
BF16_VS_TORCH_LOSS_RTOL, BF16_VS_TORCH_GRAD_TOL = 1e-3, 1.5e-2


def make_inputs(*, bias=False, train_weight=False, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*SHAPE, HIDDEN, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.3).to(dtype).requires_grad_(train_weight)
    b = (torch.randn(VOCAB, generator=gen) * 0.5).to(dtype).requires_grad_(train_weight) if bias else None
    labels = torch.randint(0, VOCAB, SHAPE, generator=gen)
    labels[0, :4] = IGNORE  # a masked prompt
    labels[5, 6] = IGNORE
    return hidden, weight, b, labels


def differentiable(hidden, weight, bias):
    return [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]


def reference_loss(hidden, weight, bias, labels):
    """float64 `F.cross_entropy(F.linear(...))`: the definition, without any chunking."""
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def reference_logps(hidden, weight, bias, labels):
    logits = F.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    valid = labels != IGNORE
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def assert_grads_close(got, want, tol):
    """Max abs error relative to the largest gradient entry, so a tolerance means the same at any scale."""
    assert len(got) == len(want)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape
        err = (g.double() - r.double()).abs().max() / r.double().abs().max().clamp(min=1e-12)
        assert err <= tol, f"gradient error {err:.3g} > {tol}"


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen", "trainable"])
def test_loss_and_gradients_match_float64(chunk, bias, train_weight):
    hidden, weight, b, labels = make_inputs(bias=bias, train_weight=train_weight)
    params = differentiable(hidden, weight, b)
    scale = 0.37  # the caller divides by its token count: backward must scale by grad_output

    loss = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=chunk)
    grads = torch.autograd.grad(loss * scale, params)
    want = reference_loss(hidden, weight, b, labels)
    want_grads = torch.autograd.grad(want * scale, params)

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert loss.item() == pytest.approx(want.item(), rel=FP32_LOSS_RTOL)
    assert len(grads) == (3 if bias and train_weight else 2 if train_weight else 1)
    assert_grads_close(grads, want_grads, FP32_GRAD_TOL)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, b, labels = make_inputs(bias=True, train_weight=False)
    linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=4).backward()
    assert hidden.grad is not None and weight.grad is None and b.grad is None


def test_all_positions_ignored_gives_differentiable_zero():
    hidden, weight, b, labels = make_inputs(bias=True, train_weight=True)
    labels.fill_(IGNORE)
    loss = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=10)
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    for t in (hidden, weight, b):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def test_custom_ignore_index():
    hidden, weight, b, labels = make_inputs()
    labels[labels == IGNORE] = 7  # now class 7 is the one to ignore, everywhere it occurs
    got = linear_cross_entropy(hidden, weight, labels, ignore_index=7, chunk_tokens=4)
    logits = F.linear(hidden.double(), weight.double()).reshape(-1, VOCAB)
    want = F.cross_entropy(logits, labels.reshape(-1), ignore_index=7, reduction="sum")
    assert got.item() == pytest.approx(want.item(), rel=FP32_LOSS_RTOL)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_bf16_autocast_matches_reference_within_bf16_tolerance(bias):
    hidden, weight, b, labels = make_inputs(bias=bias, train_weight=True)
    params = differentiable(hidden, weight, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=10)
        grads = torch.autograd.grad(loss, params)
        torch_loss = F.cross_entropy(
            F.linear(hidden, weight, b).float().reshape(-1, VOCAB), labels.reshape(-1), reduction="sum"
        )
        torch_grads = torch.autograd.grad(torch_loss, params)
    want = reference_loss(hidden, weight, b, labels)
    want_grads = torch.autograd.grad(want, params)

    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [p.dtype for p in params]  # gradients come back in each tensor's dtype
    assert loss.item() == pytest.approx(want.item(), rel=BF16_LOSS_RTOL)
    assert_grads_close(grads, want_grads, BF16_GRAD_TOL)
    assert loss.item() == pytest.approx(torch_loss.item(), rel=BF16_VS_TORCH_LOSS_RTOL)
    assert_grads_close(grads, torch_grads, BF16_VS_TORCH_GRAD_TOL)
    # The matmul really ran in bf16: fp32 math would be far closer to the float64 reference than this.
    assert abs(loss.item() - want.item()) > 10 * FP32_LOSS_RTOL * abs(want.item())


def test_bf16_model_without_autocast_keeps_bf16_gradients():
    hidden, weight, b, labels = make_inputs(bias=True, train_weight=True, dtype=torch.bfloat16)
    params = differentiable(hidden, weight, b)
    loss = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=4)
    grads = torch.autograd.grad(loss, params)
    want = reference_loss(hidden, weight, b, labels)
    want_grads = torch.autograd.grad(want, params)
    assert loss.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads)
    assert loss.item() == pytest.approx(want.item(), rel=BF16_LOSS_RTOL)
    assert_grads_close(grads, want_grads, BF16_GRAD_TOL)


def _refuse(*args, **kwargs):
    raise AssertionError("evaluation must not run the gradient pass")


def test_evaluation_computes_only_the_forward(monkeypatch):
    hidden, weight, b, labels = make_inputs(bias=True, train_weight=True)
    want = reference_loss(hidden, weight, b, labels).item()
    want_logps = reference_logps(hidden, weight, b, labels)
    monkeypatch.setattr(ce._LinearCrossEntropy, "apply", _refuse)
    monkeypatch.setattr(ce._LinearTokenLogps, "apply", _refuse)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=4)
        logps = linear_token_logps(hidden, weight, labels, bias=b, chunk_tokens=4)
    assert loss.grad_fn is None and loss.item() == pytest.approx(want, rel=FP32_LOSS_RTOL)
    assert logps.grad_fn is None and torch.allclose(logps.double(), want_logps, atol=1e-5)
    # Nothing requiring grad is the same case, even with grad mode on.
    frozen = linear_cross_entropy(hidden.detach(), weight.detach(), labels, bias=b.detach(), chunk_tokens=4)
    assert frozen.grad_fn is None and frozen.item() == pytest.approx(want, rel=FP32_LOSS_RTOL)


def test_labels_must_match_the_tokens():
    hidden, weight, _, labels = make_inputs()
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_token_logps(hidden, weight, labels, chunk_tokens=0)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozen", "trainable"])
def test_token_logps_and_gradients_match_float64(chunk, bias, train_weight):
    hidden, weight, b, labels = make_inputs(bias=bias, train_weight=train_weight, seed=1)
    params = differentiable(hidden, weight, b)
    # A different weight per position (as DPO's chosen/rejected sums and their β give), and the ignored ones
    # must get no gradient whatever their weight.
    upstream = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))

    logps = linear_token_logps(hidden, weight, labels, bias=b, chunk_tokens=chunk)
    grads = torch.autograd.grad(logps, params, grad_outputs=upstream)
    want = reference_logps(hidden, weight, b, labels)
    want_grads = torch.autograd.grad(want, params, grad_outputs=upstream.double())

    assert logps.shape == labels.shape and logps.dtype == torch.float32
    assert torch.all(logps[labels == IGNORE] == 0.0)
    assert torch.allclose(logps.double(), want, rtol=FP32_LOSS_RTOL, atol=1e-5)
    assert_grads_close(grads, want_grads, FP32_GRAD_TOL)


def test_token_logps_sum_is_minus_the_loss():
    hidden, weight, b, labels = make_inputs(bias=True)
    logps = linear_token_logps(hidden, weight, labels, bias=b, chunk_tokens=10)
    loss = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=10)
    assert (-logps.sum()).item() == pytest.approx(loss.item(), rel=FP32_LOSS_RTOL)


def test_token_logps_bf16_autocast():
    hidden, weight, b, labels = make_inputs(bias=True, train_weight=True, seed=3)
    params = differentiable(hidden, weight, b)
    upstream = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = linear_token_logps(hidden, weight, labels, bias=b, chunk_tokens=4)
        grads = torch.autograd.grad(logps, params, grad_outputs=upstream)
    want = reference_logps(hidden, weight, b, labels)
    want_grads = torch.autograd.grad(want, params, grad_outputs=upstream.double())
    assert logps.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    # bf16 logits are off by up to ~0.4% of their magnitude (a few units here), i.e. a few hundredths in logp.
    assert (logps.double() - want).abs().max() < 0.1
    assert_grads_close(grads, want_grads, BF16_GRAD_TOL)


def test_works_inside_a_compiled_region():
    hidden, weight, b, labels = make_inputs(bias=True, train_weight=True)
    params = differentiable(hidden, weight, b)

    @torch.compile(backend="aot_eager", fullgraph=False)
    def step(hidden, weight, b):
        loss = linear_cross_entropy(hidden, weight, labels, bias=b, chunk_tokens=20)
        logps = linear_token_logps(hidden, weight, labels, bias=b, chunk_tokens=20)
        return loss + 0.5 * logps.sum()

    got = step(hidden, weight, b)
    grads = torch.autograd.grad(got, params)
    want = reference_loss(hidden, weight, b, labels) + 0.5 * reference_logps(hidden, weight, b, labels).sum()
    want_grads = torch.autograd.grad(want, params)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert_grads_close(grads, want_grads, 1e-4)


@pytest.mark.parametrize("vocab", [32_000, 128_256, 262_144, 2**25])
def test_default_chunk_respects_the_logits_budget(vocab):
    for n_tokens in (1, 100, 4096, 65_536 + 7):
        chunk = default_chunk_tokens(n_tokens, vocab)
        most = max(1, LOGITS_BUDGET_BYTES // (4 * vocab))
        assert 1 <= chunk <= n_tokens
        assert chunk * vocab * 4 <= LOGITS_BUDGET_BYTES or chunk == 1  # a vocabulary above budget: one token
        # Even split: no more chunks than the budget forces, so no tiny trailing chunk.
        assert -(-n_tokens // chunk) == -(-n_tokens // most)
    assert default_chunk_tokens(4096, 128_256) == 512  # 8 even chunks: big enough for an efficient matmul


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch, torch.nn.functional as F
    from kubetune_kernels.cross_entropy import linear_cross_entropy

    # VmHWM, not getrusage's ru_maxrss: the latter survives exec, so it would report the parent's (pytest's)
    # RSS at fork time whenever that is the larger figure.
    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    n, hidden_size, vocab = 2048, 64, 65536
    CHUNK = 256  # 64 MiB of fp32 logits: 8 chunks, so that a pile-up of chunks would show
    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size).requires_grad_()
    weight = torch.randn(vocab, hidden_size).mul_(0.1)
    labels = torch.randint(0, vocab, (n,))
    before = status_kib("VmRSS")
    if sys.argv[1] == "plain":
        loss = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
    else:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=CHUNK)
    loss.backward()
    growth = status_kib("VmHWM") - before
    print(json.dumps({"growth_mib": growth / 1024, "loss": loss.item()}))
    """
)


def peak_growth(which: str) -> dict:
    """Peak RSS above the settled baseline, in a fresh process so that no other test's peak counts."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, which],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(KERNELS), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_is_order_chunk_not_tokens_times_vocab():
    # 2048 x 65536 fp32 logits are 512 MiB; the plain loss holds them and their softmax gradient at once.
    plain, chunked = peak_growth("plain"), peak_growth("chunked")
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert plain["growth_mib"] >= 512
    # One chunk is 64 MiB of fp32 logits (256 tokens); measured ~80 MiB in all, so 3 chunks' worth leaves room
    # for the allocator while still failing if the logits of two chunks, or of all tokens, pile up.
    assert chunked["growth_mib"] <= 3 * 64
    assert chunked["growth_mib"] <= plain["growth_mib"] / 4
