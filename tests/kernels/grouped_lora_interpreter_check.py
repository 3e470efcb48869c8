"""Run kubetune's grouped-LoRA Triton kernels in Triton's interpreter on CPU tensors; print a JSON report.

Not a test module (pytest does not collect it): tests/kernels/test_grouped_lora.py runs it in a
subprocess with ``TRITON_INTERPRET=1``, which Triton reads when it is first imported, and judges
the errors it reports against tolerances written in the test. The test module also imports the
problem builder and the float64 per-row loop from here, so both sides check the same thing.

Per configuration (dtype of ``x`` and of the stack) it reports the largest absolute error of
``grouped_lora_triton`` against the float64 loop and the largest magnitude of the loop's result,
so the test can apply ``atol + rtol * scale``; whether rows without an adapter (index -1, a cleared
slot, a never-filled slot, an out-of-range index) came out exactly zero; and which Triton kernels
the interpreter launched, so a silent torch fallback cannot pass for a kernel check.

Usage: ``TRITON_INTERPRET=1 python tests/kernels/grouped_lora_interpreter_check.py``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
import traceback

import torch

# Odd shapes: 9 x 7 tokens, 41 in, 23 out, r_max 8; adapters of ranks 3, 5 and 8.
TOKENS, IN, OUT, R_MAX, N_SLOTS = 9 * 7, 41, 23, 8, 6
# slot: (rank, scale). Slot 3 is filled and then cleared; slot 4 first holds a rank-8 adapter and
# is then overwritten by a rank-3 one (no residue of the first may remain); slot 5 is never filled.
ADAPTERS = {0: (3, 2.0), 1: (5, 0.5), 2: (8, 1.25), 3: (5, 3.0), 4: (3, 0.75)}
CLEARED, OVERWRITTEN, NEVER_FILLED = 3, 4, 5
# x dtype, stack dtype
CONFIGS = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "bfloat16-x-float32-stack": (torch.bfloat16, torch.float32),
}


def make_problem(x_dtype: torch.dtype, stack_dtype: torch.dtype, seed: int = 0):
    """x, the stack, the index, and the adapters that are live per slot as (A, B, scale).

    The index mixes -1, every slot (the cleared and never-filled ones included) and runs of
    repeated slots. A and B are in the stack's dtype, so the float64 loop sees what the stack holds.
    """
    from kubetune_kernels.grouped_lora import AdapterStack

    generator = torch.Generator().manual_seed(seed)
    stack = AdapterStack.empty(N_SLOTS, R_MAX, IN, OUT, stack_dtype)
    live = {}
    for slot, (rank, scale) in ADAPTERS.items():
        if slot == OVERWRITTEN:
            stack.put(
                slot, torch.randn(R_MAX, IN, generator=generator), torch.randn(OUT, R_MAX, generator=generator), 9.0
            )
        a = (torch.randn(rank, IN, generator=generator) / IN**0.5).to(stack_dtype)
        b = torch.randn(OUT, rank, generator=generator).to(stack_dtype)
        stack.put(slot, a, b, scale)
        live[slot] = (a, b, scale)
    stack.clear(CLEARED)
    del live[CLEARED]
    x = torch.randn(TOKENS, IN, generator=generator).to(x_dtype)
    index = torch.randint(-1, N_SLOTS, (TOKENS,), generator=generator)
    index[:4] = -1
    index[4:10] = 2  # a run of one slot
    index[10:13] = torch.tensor([CLEARED, NEVER_FILLED, OVERWRITTEN])
    return x, stack, index, live


def loop_delta(x: torch.Tensor, index: torch.Tensor, live: dict) -> torch.Tensor:
    """The LoRA delta in float64, one row at a time, from the unpadded adapters."""
    out = torch.zeros(x.shape[0], OUT, dtype=torch.float64)
    for t in range(x.shape[0]):
        slot = int(index[t])
        if slot in live:
            a, b, scale = live[slot]
            out[t] = scale * (x[t].double() @ a.double().T) @ b.double().T
    return out


def without_adapter(index: torch.Tensor, live: dict) -> torch.Tensor:
    """Rows whose delta must be exactly zero."""
    return torch.tensor([int(i) not in live for i in index])


def error(got: torch.Tensor, want: torch.Tensor) -> list[float]:
    """[max |got - want|, max |want|], in float64."""
    return [(got.double() - want).abs().max().item(), want.abs().max().item()]


launches: collections.Counter = collections.Counter()


def count_launches() -> None:
    from triton.runtime import interpreter

    call = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return call(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counted


def check(x_dtype: torch.dtype, stack_dtype: torch.dtype) -> dict:
    from kubetune_kernels.grouped_lora import grouped_lora_triton

    x, stack, index, live = make_problem(x_dtype, stack_dtype)
    with torch.inference_mode():
        got = grouped_lora_triton(x, stack, index)
        # Out-of-range slots must read nothing and give zeros, like -1.
        outside = grouped_lora_triton(x[:3], stack, torch.tensor([N_SLOTS, 1000, -7]))
        none = grouped_lora_triton(x, stack, torch.full((TOKENS,), -1))
    zero_rows = without_adapter(index, live)
    return {
        "dtype": str(got.dtype),
        "shape": list(got.shape),
        "error": error(got, loop_delta(x, index, live)),
        "zero_rows_exact": bool((got[zero_rows] == 0).all()),
        "zero_rows": int(zero_rows.sum()),
        "out_of_range_zero": bool((outside == 0).all()),
        "all_minus_one_zero": bool((none == 0).all()),
    }


def run_check(x_dtype: torch.dtype, stack_dtype: torch.dtype) -> dict:
    before = launches.copy()
    started = time.perf_counter()
    try:
        result = check(x_dtype, stack_dtype)
    except Exception as exc:  # noqa: BLE001 - the report carries the exact failure to the test
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        cause = exc.__cause__ or exc
        result = {"failure": f"{type(exc).__name__}: {exc} (cause: {type(cause).__name__}: {cause}; at {where})"}
    result["kernels"] = dict(launches - before)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def check_small_tiles() -> dict:
    """The fp32 problem again with tiles so small that both kernels loop over ragged blocks.

    With the default tiles the odd shapes fit in one block of each kernel; here the shrink takes
    three steps over ``in`` (16 + 16 + 9) and the expand two blocks of ``out`` (16 + 7).
    """
    from kubetune_kernels import grouped_lora

    default = grouped_lora._TILE_ELEMENTS
    grouped_lora._TILE_ELEMENTS = 64
    try:
        result = run_check(torch.float32, torch.float32)
        result["tiles"] = list(grouped_lora.tile_sizes(grouped_lora.AdapterStack.empty(1, R_MAX, IN, OUT)))
    finally:
        grouped_lora._TILE_ELEMENTS = default
    return result


def probe_bf16_rounding() -> dict:
    """Does the interpreter round float32 -> bf16 to nearest, as torch and the GPU do?

    Triton 3.9's interpreter truncates instead (1 + 3 * 2**-8 + 2**-10 becomes 1 + 2**-7, not
    1 + 2**-6), so its bf16 outputs can be one bf16 step off where a GPU's are half a step off.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def to_bf16(x_ptr, y_ptr, N: tl.constexpr):
        offsets = tl.arange(0, N)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.bfloat16))

    x = torch.tensor([1 + 3 * 2**-8 + 2**-10, -(1 + 3 * 2**-8 + 2**-10)], dtype=torch.float32)
    y = torch.empty(2, dtype=torch.bfloat16)
    to_bf16[(1,)](x, y, N=2)
    return {
        "nearest": bool(torch.equal(y, x.to(torch.bfloat16))),
        "truncated": y.double().abs().tolist() == [1 + 2**-7] * 2,
    }


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 before running this check (Triton reads it at import time)")
    count_launches()
    report = {"configs": {name: run_check(*dtypes) for name, dtypes in CONFIGS.items()}}
    report["small_tiles"] = check_small_tiles()
    report["bf16_rounding"] = probe_bf16_rounding()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
