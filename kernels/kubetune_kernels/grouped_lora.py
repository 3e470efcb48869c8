"""Grouped LoRA: every row of a batch with its own adapter (or none) in one forward pass.

A serving batch mixes requests for different adapters. Running it adapter by adapter (select the
rows of adapter 1, apply it, scatter back, then adapter 2, ...) costs one pair of small matmuls and
a gather/scatter per adapter per layer, so throughput falls as adapters are added. Punica's BGMV
("batched gather matrix-vector") and S-LoRA instead keep every loaded adapter of a layer stacked in
one tensor and give each row an index into it: one launch gathers row ``t``'s ``A``/``B`` and does
all rows' small products at once, so the cost depends on the rows and the rank, not on how many
adapters the batch holds.

The LoRA delta of row ``t`` with adapter ``i = index[t]`` is ``scale[i] * (x_t A_iᵀ) B_iᵀ``; the
base layer's output is the caller's, and this module only adds what the adapters add. Two steps:

* shrink: ``s_t = scale[i] * x_t A_iᵀ`` into a ``[T, r_max]`` float32 buffer (tiny);
* expand: ``y_t = s_t B_iᵀ``, written in ``x``'s dtype.

What is padded, and why: adapters of one layer may have different ranks. Each slot of an
:class:`AdapterStack` is ``r_max`` wide and an adapter of rank ``r < r_max`` fills its first ``r``
rows of ``A`` and columns of ``B``, the rest zeros. The zero rows give zeros in ``s`` and the zero
columns multiply them, so the padding adds nothing to the result and adapters of ranks 8 and 16
share one batch. The per-adapter ``scale`` (PEFT's ``scaling``: ``alpha / r``, or ``alpha / √r`` for
rsLoRA) is taken from the adapter's own rank before padding, so padding does not change it either.

Dtypes: ``x`` is fp32, bf16 or fp16. The stack may hold ``x``'s dtype or float32 (the choice of
whoever fills it: float32 keeps adapters trained in float32 exact; ``x``'s dtype halves the bytes
read per row, which is what decode is bound by on a GPU). Both paths compute in float32 whatever the
storage (inputs are upcast before any product, sums are float32) and round once, to ``x``'s dtype,
at the end. ``scale`` is always float32.

Plain LoRA only: DoRA's magnitude vector and IA3 are not of this form (the serving engine groups
those by adapter instead). Dropout does not apply at inference.

Inference only: there is no backward. :func:`grouped_lora` refuses an input that requires a
gradient while autograd is recording, rather than return a result that silently has none.

Index values must lie in ``[-1, n_slots)``; ``-1`` means no adapter (the row's delta is zero).
They are not checked here, because checking them on a GPU would synchronise with the host on
every layer of every step; the caller builds the index. Any negative value counts as ``-1``; a
value of ``n_slots`` or more makes the torch reference raise an index error (on CPU) and the
Triton kernel treat the row as ``-1``: it never reads outside the stack.

:func:`grouped_lora_reference` is the pure-torch path (CPU, and CUDA without Triton): two
matmul steps and no Python loop over rows or adapters, by gather + ``bmm`` (BGMV) for decode-sized
batches and by one GEMM against every slot for prefill-sized ones. :func:`grouped_lora_triton`
is the Triton kernel pair; it runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1``, which
is how tests/kernels/test_grouped_lora.py checks it on a machine without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .devices import cuda_problem

try:  # Triton is optional: without it every call takes the torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the trainer image ships Triton with torch
    triton = None

__all__ = ["AdapterStack", "grouped_lora", "grouped_lora_reference", "grouped_lora_triton", "triton_problem"]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of the float32 tile one program holds per step ([r_max, BLOCK_K] or [BLOCK_N, r_max]):
# large enough to keep loads wide, small enough to stay in registers at r_max 64.
_TILE_ELEMENTS = 4096
# CUDA devices where the kernel failed once in this process, and why: they keep the reference.
_FAILED: dict[torch.device, str] = {}


@dataclass
class AdapterStack:
    """Every loaded adapter of one linear layer, one per slot, zero-padded to rank ``r_max``.

    ``a``: ``[n_slots, r_max, in_features]`` (PEFT's ``lora_A.weight`` per slot), ``b``:
    ``[n_slots, out_features, r_max]`` (``lora_B.weight``), ``scale``: ``[n_slots]`` float32. An
    empty slot is all zeros and contributes nothing. ``a`` and ``b`` share one float dtype and one
    device; ``put`` and ``clear`` change a slot in place, so a batch must not be running on it.
    """

    a: Tensor
    b: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        problem = _stack_problem(self.a, self.b, self.scale)
        if problem:
            raise ValueError(f"AdapterStack: {problem}")

    @classmethod
    def empty(
        cls,
        n_slots: int,
        r_max: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> AdapterStack:
        """A stack of ``n_slots`` empty slots (all zeros)."""
        if min(n_slots, r_max, in_features, out_features) < 1:
            raise ValueError(
                f"AdapterStack.empty: sizes must be positive, got n_slots={n_slots}, r_max={r_max}, "
                f"in_features={in_features}, out_features={out_features}"
            )
        return cls(
            a=torch.zeros(n_slots, r_max, in_features, dtype=dtype, device=device),
            b=torch.zeros(n_slots, out_features, r_max, dtype=dtype, device=device),
            scale=torch.zeros(n_slots, dtype=torch.float32, device=device),
        )

    @property
    def n_slots(self) -> int:
        return self.a.shape[0]

    @property
    def r_max(self) -> int:
        return self.a.shape[1]

    @property
    def in_features(self) -> int:
        return self.a.shape[2]

    @property
    def out_features(self) -> int:
        return self.b.shape[1]

    def put(self, slot: int, a: Tensor, b: Tensor, scale: float) -> None:
        """Copy one adapter (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``) into ``slot``, zero-padded.

        ``scale`` is the adapter's own (PEFT's ``scaling[name]``). Raises ValueError, with one line
        naming the mismatch, for a wrong shape, a rank over ``r_max`` or a slot out of range.
        """
        self._check_slot(slot)
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"lora_A and lora_B must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
        rank = a.shape[0]
        if rank > self.r_max:
            raise ValueError(
                f"adapter rank {rank} is over this stack's r_max {self.r_max}: build the stack with r_max >= {rank}"
            )
        if a.shape[1] != self.in_features or tuple(b.shape) != (self.out_features, rank):
            raise ValueError(
                f"adapter shapes lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)} do not fit this layer: "
                f"expected ({rank}, {self.in_features}) and ({self.out_features}, {rank})"
            )
        with torch.no_grad():
            self.a[slot].zero_()
            self.b[slot].zero_()
            self.a[slot, :rank].copy_(a)
            self.b[slot, :, :rank].copy_(b)
            self.scale[slot] = float(scale)

    def clear(self, slot: int) -> None:
        """Empty ``slot``: rows that still point at it get a zero delta."""
        self._check_slot(slot)
        with torch.no_grad():
            self.a[slot].zero_()
            self.b[slot].zero_()
            self.scale[slot] = 0.0

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot {slot} is out of range: this stack has slots 0..{self.n_slots - 1}")


def _stack_problem(a: Tensor, b: Tensor, scale: Tensor) -> str | None:
    """What is wrong with these three tensors as a stack, or None."""
    if a.dim() != 3 or b.dim() != 3 or scale.dim() != 1:
        return f"a, b, scale must be 3-D, 3-D, 1-D, got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(scale.shape)}"
    n_slots, r_max, _ = a.shape
    if b.shape[0] != n_slots or b.shape[2] != r_max or scale.shape[0] != n_slots:
        return (
            f"shapes do not agree: a {tuple(a.shape)} is [n_slots, r_max, in], so b {tuple(b.shape)} must be "
            f"[{n_slots}, out, {r_max}] and scale {tuple(scale.shape)} must be [{n_slots}]"
        )
    if a.dtype not in _FLOAT_DTYPES or b.dtype != a.dtype or scale.dtype != torch.float32:
        return f"a and b must share fp32/bf16/fp16 and scale must be float32, got {a.dtype}, {b.dtype}, {scale.dtype}"
    if not (a.device == b.device == scale.device):
        return f"a, b, scale must be on one device, got {a.device}, {b.device}, {scale.device}"
    return None


def _call_problem(x: Tensor, stack: AdapterStack, index: Tensor) -> str | None:
    """What is wrong with the arguments of a grouped LoRA call, or None (shapes only: no sync)."""
    if x.dim() != 2 or x.shape[1] != stack.in_features:
        return f"x must be [tokens, {stack.in_features}], got {tuple(x.shape)}"
    if x.dtype not in _FLOAT_DTYPES:
        return f"x must be fp32, bf16 or fp16, got {x.dtype}"
    if index.dim() != 1 or index.shape[0] != x.shape[0] or index.dtype != torch.int64:
        return f"index must be int64 [{x.shape[0]}], got {index.dtype} {tuple(index.shape)}"
    if not (x.device == index.device == stack.a.device):
        return f"x, index and the stack must be on one device, got {x.device}, {index.device}, {stack.a.device}"
    return None


def _check_call(x: Tensor, stack: AdapterStack, index: Tensor) -> None:
    problem = _call_problem(x, stack, index)
    if problem:
        raise ValueError(f"grouped_lora: {problem}")


def grouped_lora_reference(x: Tensor, stack: AdapterStack, index: Tensor) -> Tensor:
    """The LoRA delta ``[T, out]`` of each row with its own adapter, in torch; no loop over rows or adapters.

    Two loop-free forms, chosen by which reads less of the stack:

    * fewer rows than slots (decode steps): :func:`_gathered`, BGMV by gather + ``bmm``, which
      reads only the rows' own adapters;
    * at least as many rows as slots (prefill): :func:`_over_all_slots`, one GEMM against every
      slot at once, which reads each adapter once instead of once per row. Its arithmetic grows
      with ``n_slots * r_max``, but it runs as two plain GEMMs where the gather form runs ``T``
      matrix-vector products on ``T * r_max * (in + out)`` gathered elements, 10-20 times slower
      on a CPU at 512 rows (1024 -> 1024, rank 16, 16 slots: 2.2 ms against 27 ms, fp32).

    Both compute in float32 and give the same result up to the order of float32 sums. Rows with
    index ``-1`` are zeroed by ``where`` (not by a zero scale, which would turn an infinite input
    into NaN).
    """
    _check_call(x, stack, index)
    form = _gathered if x.shape[0] < stack.n_slots else _over_all_slots
    return form(x, stack, index).to(x.dtype)


def _gathered(x: Tensor, stack: AdapterStack, index: Tensor) -> Tensor:
    """BGMV: gather each row's A ``[T, r_max, in]`` and B ``[T, out, r_max]``; two batched products."""
    valid = index >= 0
    slot = index.clamp(min=0)
    a = stack.a[slot].float()
    b = stack.b[slot].float()
    s = torch.bmm(a, x.float().unsqueeze(-1)) * stack.scale[slot].view(-1, 1, 1)  # [T, r_max, 1]
    y = torch.bmm(b, s).squeeze(-1)
    return torch.where(valid.unsqueeze(-1), y, 0.0)


def _over_all_slots(x: Tensor, stack: AdapterStack, index: Tensor) -> Tensor:
    """Shrink against every slot (``[T, n_slots * r_max]``), keep each row's own ``r_max``, expand.

    The expand multiplies a row that is zero outside the row's own slot by every slot's B, so
    the other adapters add exact zeros.
    """
    tokens, n_slots, r_max = x.shape[0], stack.n_slots, stack.r_max
    valid = (index >= 0).view(tokens, 1, 1)
    slot = index.clamp(min=0).view(tokens, 1, 1)
    s_all = (x.float() @ stack.a.reshape(n_slots * r_max, -1).float().T).view(tokens, n_slots, r_max)
    s = s_all.gather(1, slot.expand(tokens, 1, r_max)) * stack.scale[slot]  # [T, 1, r_max]
    s = torch.where(valid, s, 0.0)
    own = torch.zeros_like(s_all).scatter_(1, slot.expand(tokens, 1, r_max), s)
    b_all = stack.b.float().transpose(1, 2).reshape(n_slots * r_max, -1)  # [n_slots * r_max, out]
    return own.view(tokens, n_slots * r_max) @ b_all


def grouped_lora_triton(x: Tensor, stack: AdapterStack, index: Tensor) -> Tensor:
    """The LoRA delta ``[T, out]`` of each row with its own adapter, by two Triton kernels.

    Why two kernels and not one: a program per (row, block of outputs) doing both steps would
    recompute the row's shrink ``x_t A_iᵀ`` once per output block (``out / BLOCK_N`` times the
    reads of ``A_i``), and a program per row doing all of ``out`` would leave most of a GPU idle at
    decode batch sizes. The intermediate ``[T, r_max]`` float32 buffer is ``4 * T * r_max`` bytes,
    so the second launch costs less than either. Punica splits its BGMV the same way
    (``bgmv_shrink`` / ``bgmv_expand``).

    Each program handles one row (BGMV: a matrix-vector product per row), so rows that share an
    adapter each read it; a segmented variant (SGMV: rows sorted by adapter, tensor-core tiles per
    segment) would read each adapter once per prefill chunk and is the next step if prefill
    dominates. Runs on CUDA, or on CPU tensors when Triton was imported with ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("grouped_lora_triton: triton is not importable")
    _check_call(x, stack, index)
    tokens = x.shape[0]
    y = torch.empty(tokens, stack.out_features, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return y
    x = x.contiguous()
    index = index.contiguous()
    a, b, scale = stack.a.contiguous(), stack.b.contiguous(), stack.scale.contiguous()
    r_pad, block_k, block_n = tile_sizes(stack)
    s = torch.empty(tokens, r_pad, dtype=torch.float32, device=x.device)
    _shrink_kernel[(tokens,)](
        x, a, scale, index, s, stack.n_slots, stack.r_max, stack.in_features, R_PAD=r_pad, BLOCK_K=block_k
    )
    _expand_kernel[(tokens, triton.cdiv(stack.out_features, block_n))](
        s, b, index, y, stack.n_slots, stack.r_max, stack.out_features, R_PAD=r_pad, BLOCK_N=block_n
    )
    return y


def tile_sizes(stack: AdapterStack) -> tuple[int, int, int]:
    """The kernels' ``(R_PAD, BLOCK_K, BLOCK_N)`` for this stack (powers of two, as ``tl.arange`` needs).

    ``R_PAD`` is ``r_max`` rounded up (the extra ranks are masked off); the blocks keep one
    program's float32 tile near ``_TILE_ELEMENTS`` and no wider than the layer.
    """
    r_pad = _next_power_of_2(stack.r_max)
    block_k = min(_next_power_of_2(stack.in_features), max(16, _TILE_ELEMENTS // r_pad))
    block_n = min(_next_power_of_2(stack.out_features), max(16, _TILE_ELEMENTS // r_pad))
    return r_pad, block_k, block_n


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def grouped_lora(x: Tensor, stack: AdapterStack, index: Tensor) -> Tensor:
    """The LoRA delta ``[T, out]``: row ``t`` gets ``scale[i] * (x_t A_iᵀ) B_iᵀ`` with ``i = index[t]``.

    ``index[t] == -1`` gives zeros. On CUDA with a working Triton this is :func:`grouped_lora_triton`,
    elsewhere :func:`grouped_lora_reference`; both agree to the rounding of ``x``'s dtype. If the
    kernel fails to compile or launch on a device (a slim image without the C compiler Triton
    builds its launcher with, say), that is logged once and the device keeps the reference.
    Inference only: raises ValueError for an ``x`` that requires a gradient while autograd records.
    """
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("grouped_lora is inference-only (no backward): call it under torch.inference_mode()")
    _check_call(x, stack, index)
    if x.is_cuda and triton_problem(x.device) is None:
        try:
            return grouped_lora_triton(x, stack, index)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run is a reason to fall back
            _FAILED[x.device] = f"kernel failed: {type(exc).__name__}: {exc}"
            logger.warning("grouped LoRA on %s falls back to torch: %s", x.device, _FAILED[x.device])
    return grouped_lora_reference(x, stack, index)


def triton_problem(device: torch.device | str) -> str | None:
    """Why the Triton kernel cannot run on ``device``, or None when it can (never raises)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        return f"not a device: {exc}"
    if triton is None:
        return "triton not importable"
    if device.type != "cuda":
        return f"{device.type} device, the kernel needs CUDA"
    if not torch.cuda.is_available():
        return "CUDA not available to torch"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device in _FAILED:
        return _FAILED[device]
    return cuda_problem(device.index)


if triton is not None:
    # Strides are not passed: x, the stack, s and y are contiguous (grouped_lora_triton makes them
    # so), so a row of x is ``in_features`` long, a slot of A is ``r_max * in_features``, and so on.
    # Row and slot numbers are widened to int64 before they multiply a stride.

    @triton.jit
    def _shrink_kernel(
        x_ptr,
        a_ptr,
        scale_ptr,
        index_ptr,
        s_ptr,
        n_slots,
        r_max,
        in_features,
        R_PAD: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """s[t, :] = scale[i] * A_i x_t for one row t (float32), zeros when i is -1 or out of range."""
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(index_ptr + t)
        valid = (slot >= 0) & (slot < n_slots)
        slot = tl.where(valid, slot, 0)
        ranks = tl.arange(0, R_PAD)
        rank_ok = ranks < tl.where(valid, r_max, 0)  # no rank of a row without adapter is read
        a_rows = a_ptr + slot * r_max * in_features + ranks[:, None] * in_features
        acc = tl.zeros((R_PAD,), dtype=tl.float32)
        for k in range(0, in_features, BLOCK_K):
            cols = k + tl.arange(0, BLOCK_K)
            col_ok = cols < in_features
            x = tl.load(x_ptr + t * in_features + cols, mask=col_ok, other=0.0).to(tl.float32)
            a = tl.load(a_rows + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        scale = tl.load(scale_ptr + slot, mask=valid, other=0.0)
        tl.store(s_ptr + t * R_PAD + ranks, acc * scale)

    @triton.jit
    def _expand_kernel(
        s_ptr, b_ptr, index_ptr, y_ptr, n_slots, r_max, out_features, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        """y[t, block] = B_i[block] s_t for one row t and one block of outputs, in y's dtype."""
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(index_ptr + t)
        valid = (slot >= 0) & (slot < n_slots)
        slot = tl.where(valid, slot, 0)
        ranks = tl.arange(0, R_PAD)
        rank_ok = ranks < tl.where(valid, r_max, 0)
        outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ok = outs < out_features
        s = tl.load(s_ptr + t * R_PAD + ranks, mask=rank_ok, other=0.0)
        b_tile = b_ptr + slot * out_features * r_max + outs[:, None] * r_max + ranks[None, :]
        b = tl.load(b_tile, mask=out_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        y = tl.sum(b * s[None, :], axis=1)
        tl.store(y_ptr + t * out_features + outs, y.to(y_ptr.dtype.element_ty), mask=out_ok)
