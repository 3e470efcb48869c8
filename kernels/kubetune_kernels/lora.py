"""LoRA linear layers, the LoRA SwiGLU MLP and the fused QKV projection as autograd Functions.

PEFT runs a LoRA layer as four autograd nodes (base linear, dropout, ``lora_A``, ``lora_B``) plus the
add, and each node saves its own input. In a Llama MLP that means autograd keeps ``silu(gate)``,
``silu(gate) * up`` and, under autocast, a low-precision copy of every input and every frozen weight,
none of which a hand-written backward needs. The Functions here save only:

* the layer input ``x`` once (or, with dropout in training, the dropped input and a one-byte mask),
* the ``[tokens, r]`` products ``x·Aᵀ`` (small: r is 8-64),
* for the MLP, the two projections ``e = gate(x)`` and ``g = up(x)``; ``h = silu(e)·g`` is recomputed in
  backward instead of being kept.

The frozen base weight is read again in backward; a 4-bit weight is dequantised again there, so a
dequantised copy never outlives one matmul.

The backward is hand-written and matmul based, in the manner of Unsloth's ``fast_lora``. Why no
Triton: the work is matmuls, which cuBLAS (or the CPU BLAS) already does as well as anything we would
write; the scale and the adds ride inside the GEMMs (``addmm_``) where the dtypes allow, and the only
elementwise parts left (SiLU, the gating product, the dropout scale) are cheap and are left to
``torch.compile`` or Liger Kernel to fuse. Keeping these Functions pure torch also means they run, and
are tested, on CPU exactly as on a GPU.

4-bit (QLoRA): the NF4/FP4 base weight is dequantised with bitsandbytes' own
``bitsandbytes.functional.dequantize_4bit`` inside forward and again inside backward. This is the
documented fallback rather than a fused dequantise-in-the-matmul kernel: it costs one transient
``[out, in]`` tensor per call, which is what bitsandbytes' own ``matmul_4bit`` does too.

Numerics follow PEFT's ``lora.Linear.forward`` so that switching the kernels on does not move a loss
curve: without autocast the base runs in W's dtype and the adapter in ``lora_A``'s dtype (PEFT casts
``x`` to it), the two are added in their promoted dtype and the result is returned in the base's dtype;
a bitsandbytes 4-bit base runs in its compute dtype and returns ``x``'s dtype. Under ``torch.autocast``
every matmul runs in the autocast dtype, as ``F.linear`` would. Gradients of A and B come back in their
own dtype (fp32 for PEFT's default adapters). With mixed dtypes (a bf16 model with fp32 adapters) the
forward is PEFT's bit for bit; with one dtype throughout, the fused ``addmm_`` may differ in the last
bit. Dropout draws its mask the way ``nn.Dropout`` does on CPU (``bernoulli_`` on a tensor shaped like
the input, in ``lora_A``'s dtype), so the same seed gives PEFT's mask there; on CUDA ``nn.Dropout``
uses a fused kernel with its own draws, so the masks have the same law but are not the same.

They compose with ``torch.compile``: the Functions are plain ``torch.autograd.Function`` subclasses whose
arguments are tensors and constants, which Dynamo traces into the graph (checked with ``fullgraph=True``
and the ``aot_eager`` backend in the tests, the 4-bit path included, where bitsandbytes' dequantise is
itself a registered torch op), so no custom-op registration is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["LoraWeights", "dequantize", "from_peft", "lora_linear", "lora_mlp", "lora_qkv", "variant_problem"]


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA'd linear layer, independent of PEFT's module classes.

    ``weight`` is the frozen base weight ``[out, in]`` or a bitsandbytes ``Params4bit`` (then
    ``quant_state`` is its ``QuantState``); ``a`` is ``lora_A.weight`` ``[r, in]``, ``b`` is
    ``lora_B.weight`` ``[out, r]``; ``scale`` is PEFT's ``scaling`` (alpha / r, or alpha / sqrt(r));
    ``dropout`` is the adapter's dropout probability. ``compute_dtype`` is the 4-bit layer's
    ``compute_dtype`` (None: the input's dtype), unused for a float base.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    dropout: float = 0.0
    quant_state: Any = None
    compute_dtype: torch.dtype | None = None


def dequantize(w: LoraWeights, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a dense ``[out, in]`` tensor in ``dtype``."""
    if w.quant_state is None:
        return w.weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(w.weight, w.quant_state).to(dtype)


# --------------------------------------------------------------------------------------------- PEFT


def from_peft(module: torch.nn.Module, adapter: str = "default") -> tuple[LoraWeights | None, str]:
    """Read a PEFT LoRA linear layer; ``(None, reason)`` when these kernels would compute something else.

    The reason is a short phrase for a log line ("DoRA adapter", "adapters disabled", ...). On success
    the reason is the empty string.
    """
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A"):
        return None, f"not a LoRA layer ({type(module).__name__})"
    reason = _unsupported_adapter(module, adapter)
    if reason:
        return None, reason
    base = module.get_base_layer()
    weight, quant_state, compute_dtype, reason = _base_weight(base)
    if reason:
        return None, reason
    if weight.requires_grad:
        return None, "base weight is trainable"
    dropout = module.lora_dropout[adapter]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    if p >= 1.0:
        return None, "lora_dropout of 1"
    return (
        LoraWeights(
            weight=weight,
            bias=base.bias,
            a=module.lora_A[adapter].weight,
            b=module.lora_B[adapter].weight,
            scale=float(module.scaling[adapter]),
            dropout=p,
            quant_state=quant_state,
            compute_dtype=compute_dtype,
        ),
        "",
    )


def _unsupported_adapter(module, adapter: str) -> str:
    """Everything about the adapter that makes PEFT compute more than ``x Wᵀ + s·(x Aᵀ)Bᵀ``."""
    if module.disable_adapters:
        return "adapters disabled"
    if module.merged:
        return "adapter merged into the base weight"
    if len(module.active_adapters) != 1:
        return "more than one active adapter"
    if adapter not in module.active_adapters or adapter not in module.lora_A:
        return f"adapter {adapter!r} not active"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    return variant_problem(module, adapter)


def variant_problem(module, adapter: str) -> str:
    """What makes this adapter of a PEFT LoRA layer more than the plain delta ``s·(x Aᵀ)Bᵀ`` (DoRA,
    a LoRA bias, another LoRA variant), or the empty string. Shared by the training kernels and the
    serving runtime's grouped LoRA, which both compute only that delta."""
    if module.use_dora.get(adapter, False):
        return "DoRA adapter"
    if getattr(module, "lora_bias", {}).get(adapter, False):
        return "lora_bias adapter"
    if adapter in getattr(module, "lora_variant", {}):
        return f"LoRA variant {type(module.lora_variant[adapter]).__name__}"
    return ""


def _base_weight(base: torch.nn.Module):
    """(weight, quant_state, compute_dtype, reason) for a plain or 4-bit bitsandbytes base layer."""
    kind = type(base).__name__
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: only plain layers are possible anyway
        bnb = None
    if bnb is not None and isinstance(base, bnb.nn.Linear4bit):
        state = base.weight.quant_state
        if state is None:
            return None, None, None, "4-bit weight not quantised yet"
        if getattr(state, "packing_format_for_cpu", False):
            return None, None, None, "4-bit weight repacked for CPU inference"
        return base.weight, state, base.compute_dtype, ""
    if bnb is not None and isinstance(base, bnb.nn.Linear8bitLt):
        return None, None, None, "8-bit base layer unsupported"
    if isinstance(base, torch.nn.Linear) and type(base).forward is torch.nn.Linear.forward:
        return base.weight, None, None, ""  # nn.Linear, or a wrapper class that keeps its forward (FSDP2)
    return None, None, None, f"base layer {kind} unsupported"


# --------------------------------------------------------------------------------- dtypes and plans


class _Plan(NamedTuple):
    """Everything static about one projection in one call: the dtypes PEFT would use, scale, dropout."""

    scale: float
    p: float  # dropout probability in effect (0 outside training)
    quant_state: Any
    base_dtype: torch.dtype  # the frozen matmul
    a_dtype: torch.dtype  # lora_A's own dtype: where PEFT applies dropout
    adapter_dtype: torch.dtype  # the two adapter matmuls
    sum_dtype: torch.dtype  # base + adapter
    out_dtype: torch.dtype


def _plan(x_dtype: torch.dtype, device: str, w: LoraWeights, training: bool) -> _Plan:
    """The dtypes PEFT's forward would use for this input, here and now (autocast is read at call time)."""
    p = float(w.dropout) if training else 0.0
    autocast = torch.is_autocast_enabled(device)
    if w.quant_state is not None:  # peft.tuners.lora.bnb.Linear4bit: result in x's dtype
        if autocast:
            ac = torch.get_autocast_dtype(device)
            return _Plan(w.scale, p, w.quant_state, ac, w.a.dtype, ac, torch.promote_types(x_dtype, ac), x_dtype)
        base = w.compute_dtype or x_dtype
        return _Plan(w.scale, p, w.quant_state, base, w.a.dtype, w.a.dtype, x_dtype, x_dtype)
    if autocast:
        ac = torch.get_autocast_dtype(device)
        return _Plan(w.scale, p, None, ac, w.a.dtype, ac, ac, ac)
    base = w.weight.dtype
    return _Plan(w.scale, p, None, base, w.a.dtype, w.a.dtype, torch.promote_types(base, w.a.dtype), base)


def _dropout_mask(x: torch.Tensor, w: LoraWeights, plan: _Plan, features: int) -> torch.Tensor | None:
    """The keep-mask ``nn.Dropout`` would draw for this input (same RNG use on CPU), as bool."""
    if plan.p == 0.0:
        return None
    shape = (*x.shape[:-1], features)
    noise = torch.empty(shape, dtype=plan.a_dtype, device=x.device).bernoulli_(1.0 - plan.p)
    return noise.reshape(-1, features).bool()


def _keep_scale(mask: torch.Tensor, plan: _Plan) -> torch.Tensor:
    return mask.to(plan.a_dtype) / (1.0 - plan.p)


def _dropped(x2: torch.Tensor, mask: torch.Tensor | None, plan: _Plan) -> torch.Tensor:
    """The adapter's input: x in lora_A's dtype, dropout applied, then in the adapter matmul dtype."""
    xa = x2.to(plan.a_dtype)
    if mask is not None:
        xa = xa * _keep_scale(mask, plan)
    return xa.to(plan.adapter_dtype)


def _frozen(weight: torch.Tensor, plan: _Plan) -> torch.Tensor:
    if plan.quant_state is None:
        return weight.to(plan.base_dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight, plan.quant_state).to(plan.base_dtype)


# ------------------------------------------------------------------------------ one projection


def _uniform(plan: _Plan) -> bool:
    """One dtype throughout (fp32, or anything under autocast): the scale and the adds can live in the GEMMs."""
    return plan.base_dtype == plan.adapter_dtype == plan.sum_dtype == plan.out_dtype


def _proj_forward(x2, plan: _Plan, weight, bias, a, b, mask):
    """(output, x·Aᵀ, dropped x) for a 2-D input.

    With one dtype throughout, ``s·(x·Aᵀ)·Bᵀ`` is accumulated onto the base output by the GEMM itself
    (``addmm_`` with alpha=s), which saves two full ``[tokens, out]`` passes. With mixed dtypes (a bf16
    model with PEFT's fp32 adapters) it mirrors PEFT's casts and adds one by one, so the result is
    PEFT's to the bit.
    """
    bias = None if bias is None else bias.to(plan.base_dtype)
    base = F.linear(x2.to(plan.base_dtype), _frozen(weight, plan), bias)
    xd = _dropped(x2, mask, plan)
    xa = F.linear(xd, a.to(plan.adapter_dtype))
    if _uniform(plan):
        return base.addmm_(xa, b.to(plan.adapter_dtype).t(), alpha=plan.scale), xa, xd
    lora = F.linear(xa, b.to(plan.adapter_dtype)) * plan.scale
    out = (base.to(plan.sum_dtype) + lora.to(plan.sum_dtype)).to(plan.out_dtype)
    return out, xa, xd


def _proj_backward(grad, plan: _Plan, weight, a, b, xa, xd, mask, x_dtype, acc):
    """(grad_x, grad_A, grad_B) given the output grad; W and bias are frozen.

    ``acc`` is the x-gradient accumulated so far by the other projections of the same input (None:
    this is the first one); this projection's part is added onto it, in place where the dtypes allow,
    so a fused QKV or gate/up pair builds one ``[tokens, in]`` buffer. ``acc=False`` means x needs no
    gradient; it is then returned as is.
    """
    adt = plan.adapter_dtype
    gs = grad.to(plan.sum_dtype)
    if _uniform(plan):  # fold the scale into the small [tokens, r] and [out, r] products
        grad_b = (gs.t() @ xa).mul_(plan.scale).to(b.dtype)
        gxa = (gs @ b.to(adt)).mul_(plan.scale)
    else:  # PEFT's autograd order: the scale multiplies the full [tokens, out] gradient
        gl = gs.to(adt) * plan.scale
        grad_b = (gl.t() @ xa).to(b.dtype)
        gxa = gl @ b.to(adt)
    grad_a = (gxa.t() @ xd).to(a.dtype)
    if acc is False:
        return False, grad_a, grad_b
    w = _frozen(weight, plan)
    gb = gs.to(plan.base_dtype)
    if x_dtype == plan.base_dtype == adt and mask is None:  # everything lands in one buffer
        acc = gb @ w if acc is None else acc.addmm_(gb, w)
        return acc.addmm_(gxa, a.to(adt)), grad_a, grad_b
    gx = (gxa @ a.to(adt)).to(plan.a_dtype)
    if mask is not None:
        gx = gx * _keep_scale(mask, plan)
    part = (gb @ w).to(x_dtype).add_(gx.to(x_dtype))
    return part if acc is None else acc.add_(part), grad_a, grad_b


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# ------------------------------------------------------------------------------------ Functions


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, weight, bias, a, b, mask):
        x2 = _flat(x)
        out, xa, xd = _proj_forward(x2, plan, weight, bias, a, b, mask)
        ctx.plan, ctx.x_dtype, ctx.x_shape = plan, x.dtype, x.shape
        # Without dropout the adapter input is x itself (or its cast): keep x, which the caller
        # holds anyway, and cast again in backward. With dropout the dropped input is new memory
        # either way, so keep it and the one-byte mask the x-gradient needs.
        kept = xd if mask is not None else x2
        ctx.save_for_backward(kept, xa, mask, weight, a, b)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        kept, xa, mask, weight, a, b = ctx.saved_tensors
        plan = ctx.plan
        xd = kept if mask is not None else _dropped(kept, None, plan)
        acc = None if ctx.needs_input_grad[0] else False
        gx, ga, gb = _proj_backward(_flat(grad), plan, weight, a, b, xa, xd, mask, ctx.x_dtype, acc)
        gx = None if gx is False else gx.reshape(ctx.x_shape)
        return gx, None, None, None, ga, gb, None


def _swiglu(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return F.silu(e) * g  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), in the projections' dtype


class _LoraMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plans, *t):
        pg, pu, pd = plans
        gw, gbias, ga, gb, gmask, uw, ubias, ua, ub, umask, dw, dbias, da, db, dmask = t
        x2 = _flat(x)
        e, xa_g, _ = _proj_forward(x2, pg, gw, gbias, ga, gb, gmask)
        g, xa_u, _ = _proj_forward(x2, pu, uw, ubias, ua, ub, umask)
        y, xa_d, _ = _proj_forward(_swiglu(e, g), pd, dw, dbias, da, db, dmask)
        ctx.plans, ctx.x_dtype, ctx.x_shape = plans, x.dtype, x.shape
        ctx.save_for_backward(x2, e, g, xa_g, xa_u, xa_d, gmask, umask, dmask, gw, ga, gb, uw, ua, ub, dw, da, db)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, e, g, xa_g, xa_u, xa_d, gmask, umask, dmask, gw, ga, gb, uw, ua, ub, dw, da, db = ctx.saved_tensors
        pg, pu, pd = ctx.plans
        silu = F.silu(e)
        h = silu * g  # recomputed: cheaper than keeping silu(e) and h for every layer
        gh, grad_da, grad_db = _proj_backward(
            _flat(grad), pd, dw, da, db, xa_d, _dropped(h, dmask, pd), dmask, h.dtype, None
        )
        del h
        grad_g = gh * silu
        del silu
        # the same two kernels autograd runs for silu(e)·g, in the same dtype: mul, then silu_backward
        grad_e = torch.ops.aten.silu_backward(gh.mul_(g), e)
        del gh
        acc = None if ctx.needs_input_grad[0] else False
        gx, grad_ga, grad_gb = _proj_backward(
            grad_e, pg, gw, ga, gb, xa_g, _dropped(x2, gmask, pg), gmask, ctx.x_dtype, acc
        )
        gx, grad_ua, grad_ub = _proj_backward(
            grad_g, pu, uw, ua, ub, xa_u, _dropped(x2, umask, pu), umask, ctx.x_dtype, gx
        )
        gx = None if gx is False else gx.reshape(ctx.x_shape)
        return (
            gx,
            None,
            *(None, None, grad_ga, grad_gb, None),
            *(None, None, grad_ua, grad_ub, None),
            *(None, None, grad_da, grad_db, None),
        )


class _LoraQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plans, *t):
        x2 = _flat(x)
        outs, xas = [], []
        for i, plan in enumerate(plans):
            weight, bias, a, b, mask = t[5 * i : 5 * i + 5]
            out, xa, _ = _proj_forward(x2, plan, weight, bias, a, b, mask)
            outs.append(out.reshape(*x.shape[:-1], out.shape[-1]))
            xas.append(xa)
        ctx.plans, ctx.x_dtype, ctx.x_shape = plans, x.dtype, x.shape
        ctx.set_materialize_grads(False)
        masks = t[4::5]
        weights = [t[5 * i + j] for i in range(3) for j in (0, 2, 3)]
        ctx.save_for_backward(x2, *xas, *masks, *weights)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, *rest = ctx.saved_tensors
        xas, masks, weights = rest[0:3], rest[3:6], rest[6:15]
        gx, per_input = (None if ctx.needs_input_grad[0] else False), []
        for i, (plan, grad) in enumerate(zip(ctx.plans, grads, strict=True)):
            if grad is None:  # this output was not used
                per_input += [None] * 5
                continue
            weight, a, b = weights[3 * i : 3 * i + 3]
            xd = _dropped(x2, masks[i], plan)
            gx, ga, gb = _proj_backward(_flat(grad), plan, weight, a, b, xas[i], xd, masks[i], ctx.x_dtype, gx)
            per_input += [None, None, ga, gb, None]
        gx = None if gx is None or gx is False else gx.reshape(ctx.x_shape)  # None: no output used
        return gx, None, *per_input


# ------------------------------------------------------------------------------------ public API


def _tensors(w: LoraWeights, mask):
    return (w.weight, w.bias, w.a, w.b, mask)


def lora_linear(x: torch.Tensor, w: LoraWeights, training: bool) -> torch.Tensor:
    """``x Wᵀ + bias + scale·(dropout(x) Aᵀ) Bᵀ``; gradients for x, A and B only."""
    plan = _plan(x.dtype, x.device.type, w, training)
    mask = _dropout_mask(x, w, plan, x.shape[-1])
    return _LoraLinear.apply(x, plan, *_tensors(w, mask))


def lora_mlp(x: torch.Tensor, gate: LoraWeights, up: LoraWeights, down: LoraWeights, training: bool) -> torch.Tensor:
    """Llama's SwiGLU MLP ``down(silu(gate(x)) · up(x))`` with all three projections LoRA'd."""
    pg, pu = _plan(x.dtype, x.device.type, gate, training), _plan(x.dtype, x.device.type, up, training)
    gmask = _dropout_mask(x, gate, pg, x.shape[-1])  # drawn in PEFT's order: gate, up, down
    umask = _dropout_mask(x, up, pu, x.shape[-1])
    h_dtype = pg.out_dtype  # silu(e)·g keeps the projections' dtype, like LlamaMLP
    pd = _plan(h_dtype, x.device.type, down, training)
    dmask = _dropout_mask(x, down, pd, down.a.shape[1])
    plans = (pg, pu, pd)
    return _LoraMLP.apply(x, plans, *_tensors(gate, gmask), *_tensors(up, umask), *_tensors(down, dmask))


def lora_qkv(
    x: torch.Tensor, q: LoraWeights, k: LoraWeights, v: LoraWeights, training: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three attention projections of one input; x is saved once and its gradient summed."""
    plans = tuple(_plan(x.dtype, x.device.type, w, training) for w in (q, k, v))
    masks = [_dropout_mask(x, w, plan, x.shape[-1]) for w, plan in zip((q, k, v), plans, strict=True)]
    tensors = [t for w, mask in zip((q, k, v), masks, strict=True) for t in _tensors(w, mask)]
    return _LoraQKV.apply(x, plans, *tensors)
