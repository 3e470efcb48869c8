"""Linear cross-entropy that never holds the whole ``[tokens, vocab]`` logits: pure torch, any device.

A causal LM's loss is ``cross_entropy(lm_head(hidden), labels)``. With Llama 3's 128,256-token vocabulary
the fp32 logits of one 4096-token micro-batch weigh 2 GiB, and autograd keeps them (and the softmax) alive
until backward: on small models the loss is the largest activation of the step. Here the tokens are walked in
chunks; each chunk's logits live only while that chunk is processed.

``linear_cross_entropy`` works as Liger Kernel's fused linear cross-entropy does, in plain torch so it runs on
CPU and wherever Triton cannot: the forward pass computes, chunk by chunk, the loss *and* its gradient with
respect to the hidden states (and accumulates the lm_head's gradient when it is trained), so backward only
scales what forward stored. Nothing is recomputed, so it costs the same matmuls as the plain loss.

``linear_token_logps`` gives each position's log-probability of its label, for DPO's sequence
log-probabilities. Its incoming gradient is a vector only known in backward, so there the chunk's logits are
recomputed (forward saves the per-token logsumexp, which makes the softmax one ``exp`` away).

Both follow the model's numerics exactly: the matmul runs in the dtype the lm_head would run in (the autocast
dtype when autocast is on, else the tensors' own), and everything after it in fp32, as in
``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["LOGITS_BUDGET_BYTES", "default_chunk_tokens", "linear_cross_entropy", "linear_token_logps"]

# 256 MiB of fp32 logits per chunk: 523 tokens at Llama 3's 128,256 vocabulary (a 4096-token micro-batch runs
# as 8 chunks of 512), 2097 at 32,000. Why not smaller: every chunk re-reads the whole lm_head weight (512 MiB in
# fp32 at 128,256 x 1024) for its forward and gradient matmuls, and a short chunk makes a thin, less efficient
# GEMM. Measured on a 2-core CPU (hidden 1024, vocabulary 128,256, 4096 tokens, forward + backward, frozen
# weight): 128-token chunks cost ~20.6 s of CPU time against the plain loss's ~17.5 s; 512-token chunks ~17.1 s.
# Why not larger: the point is memory. The chunk's transient peak is about twice the budget (the fp32 logits,
# reused in place for the softmax gradient, plus their copy in a bf16/fp16 matmul dtype), ~0.5 GiB, against
# the ~5.5 GiB the plain loss peaks at for that batch (its 2 GiB of logits, their log-softmax and gradient).
LOGITS_BUDGET_BYTES = 256 * 2**20


def default_chunk_tokens(n_tokens: int, vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits fit in ``budget_bytes``.

    The tokens are split evenly (9 chunks of 100, not 8 of 112 and one of 4) so the last chunk is not a
    tiny, inefficient matmul. A vocabulary larger than the budget itself still gets one token per chunk.
    """
    if n_tokens <= 0:
        return 1
    most = max(1, budget_bytes // (4 * max(1, vocab_size)))
    n_chunks = math.ceil(n_tokens / most)
    return math.ceil(n_tokens / n_chunks)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """fp32 sum of the cross-entropy of ``F.linear(hidden, weight, bias)`` against ``labels``.

    ``hidden`` is ``[..., H]``, ``weight`` ``[V, H]``, ``labels`` the leading shape of ``hidden`` (already
    shifted for next-token prediction). Positions whose label is ``ignore_index`` count for nothing; with none
    left the result is a differentiable 0.0. It is a sum, not a mean, so the caller divides by the number of
    label tokens it chooses (per micro-batch, or across gradient accumulation and ranks).

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=ignore_index,
    reduction="sum")``, autocast included. ``chunk_tokens`` overrides ``default_chunk_tokens``. Under
    ``torch.no_grad()`` (evaluation), or when nothing requires grad, only the loss is computed.
    """
    h, w, b, flat_labels = _prepare(hidden, weight, bias, labels)
    chunk = _chunk_size(chunk_tokens, h.shape[0], w.shape[0])
    wants = _wants_grad(hidden, weight, bias)
    if not any(wants):
        return _loss_only(h, w, b, flat_labels, ignore_index, chunk)
    return _LinearCrossEntropy.apply(h, w, b, flat_labels, ignore_index, chunk, *wants)


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """fp32 log-probability of each position's label under ``F.linear(hidden, weight, bias)``.

    Shape ``labels.shape``; 0.0 where the label is ``ignore_index``, so summing over the sequence gives DPO's
    sequence log-probability. Equal to ``log_softmax(F.linear(hidden, weight, bias).float()).gather(-1, labels)``
    on the counted positions, autocast included; differentiable w.r.t. whatever requires grad.
    """
    h, w, b, flat_labels = _prepare(hidden, weight, bias, labels)
    chunk = _chunk_size(chunk_tokens, h.shape[0], w.shape[0])
    wants = _wants_grad(hidden, weight, bias)
    if not any(wants):
        logps, _ = _token_logps_forward(h, w, b, flat_labels, ignore_index, chunk)
    else:
        logps = _LinearTokenLogps.apply(h, w, b, flat_labels, ignore_index, chunk, *wants)
    return logps.reshape(labels.shape)


def _prepare(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Flatten the tokens and cast to the dtype the lm_head's matmul would run in.

    The cast happens outside the autograd Functions, as autocast's own cast would, so autograd hands each
    gradient back in its tensor's own dtype; inside, autocast is switched off and the dtype is explicit.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    dtype = _matmul_dtype(hidden, weight)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    return h, w, b, labels.reshape(-1)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _wants_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, bool, bool]:
    if not torch.is_grad_enabled():
        return False, False, False
    return hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad


def _chunk_size(chunk_tokens: int | None, n_tokens: int, vocab_size: int) -> int:
    if chunk_tokens is None:
        return default_chunk_tokens(n_tokens, vocab_size)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    return chunk_tokens


def _chunks(n_tokens: int, chunk: int) -> range:
    return range(0, n_tokens, max(1, chunk))


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits in fp32, from a matmul in the inputs' dtype (autocast is off where this runs)."""
    return F.linear(h, w, b).float()


def _exp_in_place(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Overwrite a chunk's fp32 logits with ``exp(logits - row max)``; return what the loss needs from them.

    Returns (logit of the label, logsumexp, the rows' sums of those exponentials ``[chunk, 1]``, which
    positions count, labels safe to gather with); the softmax is the buffer divided by the sums. In place
    rather than ``torch.logsumexp`` / ``softmax``, which would each allocate another ``[chunk, V]``.
    """
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    target = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    sums = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
    return target, (sums.log() + row_max).squeeze(1), sums, valid, safe


def _loss_only(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    chunk: int,
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for start in _chunks(h.shape[0], chunk):
            end = start + chunk
            target, lse, _, valid, _ = _exp_in_place(_logits(h[start:end], w, b), labels[start:end], ignore_index)
            total = total + torch.where(valid, lse - target, 0.0).sum()
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients in one pass over the chunks; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, h, w, b, labels, ignore_index, chunk, want_h, want_w, want_b):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if want_h else None
        # The lm_head's gradient sums over every chunk: accumulated in fp32 so that bf16 does not round it
        # once per chunk (it costs a fp32 [V, H] buffer, only in full fine-tunes that train the lm_head).
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if want_b else None
        with torch.autocast(h.device.type, enabled=False):
            for start in _chunks(h.shape[0], chunk):
                end = start + chunk
                h_c = h[start:end]
                logits = _logits(h_c, w, b)
                target, lse, sums, valid, safe = _exp_in_place(logits, labels[start:end], ignore_index)
                total = total + torch.where(valid, lse - target, 0.0).sum()
                # d loss / d logits = softmax - one_hot(label) on counted rows, 0 on ignored ones; built in
                # place in the logits' buffer so the chunk's peak stays one [chunk, V] fp32 tensor.
                grad_logits = logits.mul_(valid.unsqueeze(1) / sums)
                grad_logits.scatter_add_(1, safe.unsqueeze(1), -valid.unsqueeze(1).to(grad_logits.dtype))
                # Cast back to the matmul dtype before the matmuls, as autograd does through `.float()`.
                grad_logits_mm = grad_logits.to(h.dtype)
                if want_h:
                    grad_h[start:end] = grad_logits_mm @ w
                if want_w:
                    grad_w.add_(grad_logits_mm.t() @ h_c)
                if want_b:
                    grad_b.add_(grad_logits.sum(0))
                del logits, grad_logits, grad_logits_mm  # free this chunk before the next one is allocated
        ctx.weight_dtype = w.dtype
        ctx.bias_dtype = None if b is None else b.dtype
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_output.float()
        out_h = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        out_w = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        out_b = None if grad_b is None else (grad_b * scale).to(ctx.bias_dtype)
        return out_h, out_w, out_b, None, None, None, None, None, None


def _token_logps_forward(
    h: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-prob of the label, 0 where ignored; per-token logsumexp), both fp32 ``[N]``."""
    n = h.shape[0]
    logps = torch.zeros(n, dtype=torch.float32, device=h.device)
    lses = torch.zeros(n, dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for start in _chunks(n, chunk):
            end = start + chunk
            target, lse, _, valid, _ = _exp_in_place(_logits(h[start:end], w, b), labels[start:end], ignore_index)
            logps[start:end] = torch.where(valid, target - lse, 0.0)
            lses[start:end] = lse
    return logps, lses


class _LinearTokenLogps(torch.autograd.Function):
    """Per-token log-probs; backward recomputes each chunk's logits, since its gradient is a whole vector."""

    @staticmethod
    def forward(ctx, h, w, b, labels, ignore_index, chunk, want_h, want_w, want_b):
        logps, lses = _token_logps_forward(h, w, b, labels, ignore_index, chunk)
        ctx.save_for_backward(h, w, b, labels, lses)
        ctx.ignore_index, ctx.chunk, ctx.wants = ignore_index, chunk, (want_h, want_w, want_b)
        return logps

    @staticmethod
    def backward(ctx, grad_output):
        h, w, b, labels, lses = ctx.saved_tensors
        want_h, want_w, want_b = ctx.wants
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if want_b else None
        grad_output = grad_output.float()
        with torch.autocast(h.device.type, enabled=False):
            for start in _chunks(h.shape[0], ctx.chunk):
                end = start + ctx.chunk
                h_c, labels_c = h[start:end], labels[start:end]
                valid = labels_c != ctx.ignore_index
                safe = torch.where(valid, labels_c, torch.zeros_like(labels_c))
                g = torch.where(valid, grad_output[start:end], 0.0).unsqueeze(1)
                # d logp / d logits = one_hot(label) - softmax, times the incoming gradient of that position.
                grad_logits = _logits(h_c, w, b).sub_(lses[start:end].unsqueeze(1)).exp_().mul_(-g)
                grad_logits.scatter_add_(1, safe.unsqueeze(1), g)
                grad_logits_mm = grad_logits.to(h.dtype)
                if want_h:
                    grad_h[start:end] = grad_logits_mm @ w
                if want_w:
                    grad_w.add_(grad_logits_mm.t() @ h_c)
                if want_b:
                    grad_b.add_(grad_logits.sum(0))
                del grad_logits, grad_logits_mm  # free this chunk before the next one is allocated
        out_w = None if grad_w is None else grad_w.to(w.dtype)
        out_b = None if grad_b is None else grad_b.to(b.dtype)
        return grad_h, out_w, out_b, None, None, None, None, None, None
