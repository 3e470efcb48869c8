"""Grouped LoRA (one adapter per row, in one pass) against a float64 per-row loop.

Shapes are odd on purpose (9x7 tokens, 41 in, 23 out, r_max 8 with adapters of ranks 3, 5 and 8);
the index mixes -1, repeated slots, a cleared slot, a never-filled slot and a slot overwritten by a
narrower adapter (tests/kernels/grouped_lora_interpreter_check.py builds the problem for both
sides). The torch reference runs here; the Triton kernels run on CPU tensors in Triton's
interpreter, in a subprocess because Triton reads ``TRITON_INTERPRET`` when it is imported. The
CUDA side is tests/gpu/test_gpu_grouped_lora.py.
"""

from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch", reason="NOT RUN: kernel tests need the [trainer] extra (make setup)")

from kubetune_kernels import grouped_lora as gl  # noqa: E402
from tests.kernels.grouped_lora_interpreter_check import (  # noqa: E402
    CONFIGS,
    IN,
    N_SLOTS,
    OUT,
    OVERWRITTEN,
    R_MAX,
    TOKENS,
    error,
    loop_delta,
    make_problem,
    without_adapter,
)
from tests.kernels.support import run_in_interpreter  # noqa: E402

CHECK_SCRIPT = Path(__file__).with_name("grouped_lora_interpreter_check.py")

# |got - float64 loop| <= atol + rtol * max|loop|. Both paths compute in float32 and round once to
# x's dtype, so the error is that rounding: half a step of the dtype at the largest value, and one
# epsilon (2**-8 for bf16, 2**-11 * 2 for fp16) leaves a factor two. fp32 is sums of ~50 terms.
TOLERANCES = {
    "float32": {"atol": 1e-6, "rtol": 1e-6},
    "bfloat16": {"atol": 0.0, "rtol": 2**-8},
    "float16": {"atol": 0.0, "rtol": 2**-10},
}
# Triton 3.9's interpreter truncates float32 -> bf16 instead of rounding to nearest (the check
# script's probe; asserted below), so there a bf16 result may be a whole step off.
INTERPRETER_TOLERANCES = {**TOLERANCES, "bfloat16": {"atol": 0.0, "rtol": 2**-7}}


def over_tolerance(pair: list[float], dtype: str, tolerances: dict = TOLERANCES) -> bool:
    err, scale = pair
    tol = tolerances[dtype]
    return not (err == err and err <= tol["atol"] + tol["rtol"] * scale)  # err == err is False for NaN


def x_dtype_name(config: str) -> str:
    return str(CONFIGS[config][0]).removeprefix("torch.")


# --- the torch reference ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["_gathered", "_over_all_slots"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_reference_matches_float64_loop(config, form):
    """Both loop-free forms of the reference, each on the whole odd-shaped problem."""
    x, stack, index, live = make_problem(*CONFIGS[config])
    with torch.inference_mode():
        got = getattr(gl, form)(x, stack, index).to(x.dtype)
    assert got.shape == (TOKENS, OUT)
    pair = error(got, loop_delta(x, index, live))
    assert not over_tolerance(pair, x_dtype_name(config)), (config, pair, TOLERANCES[x_dtype_name(config)])
    zero_rows = without_adapter(index, live)
    assert 10 < int(zero_rows.sum()) < TOKENS  # the problem mixes both kinds of rows
    assert (got[zero_rows] == 0).all()
    assert (got[~zero_rows].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("tokens", [N_SLOTS - 1, N_SLOTS, TOKENS])
def test_reference_takes_the_gather_form_for_fewer_rows_than_slots(tokens, monkeypatch):
    x, stack, index, live = make_problem(torch.bfloat16, torch.bfloat16)
    x, index = x[-tokens:], index[-tokens:]
    taken = []
    for name in ("_gathered", "_over_all_slots"):
        form = getattr(gl, name)
        monkeypatch.setattr(gl, name, lambda *args, name=name, form=form: taken.append(name) or form(*args))
    with torch.inference_mode():
        got = gl.grouped_lora_reference(x, stack, index)
    assert taken == ["_gathered" if tokens < N_SLOTS else "_over_all_slots"]
    assert got.dtype == torch.bfloat16
    assert not over_tolerance(error(got, loop_delta(x, index, live)), "bfloat16")


@pytest.mark.parametrize("tokens", [N_SLOTS - 1, TOKENS])
def test_reference_gives_exact_zeros_when_no_row_has_an_adapter(tokens):
    x, stack, _, _ = make_problem(torch.float32, torch.float32)
    x = x[:tokens].clone()
    x[0, 0] = float("inf")  # masked rows stay zero: a zero scale would make inf * 0 = NaN
    with torch.inference_mode():
        got = gl.grouped_lora_reference(x, stack, torch.full((tokens,), -1))
    assert torch.equal(got, torch.zeros(tokens, OUT))


@pytest.mark.parametrize("tokens", [3, TOKENS])
def test_reference_counts_negative_slots_as_none_and_raises_for_slots_past_the_stack(tokens):
    x, stack, _, _ = make_problem(torch.float32, torch.float32)
    x = x[:tokens]
    with torch.inference_mode():
        assert torch.equal(gl.grouped_lora_reference(x, stack, torch.full((tokens,), -7)), torch.zeros(tokens, OUT))
        with pytest.raises((IndexError, RuntimeError), match="out of bounds|out of range"):
            gl.grouped_lora_reference(x, stack, torch.full((tokens,), N_SLOTS))


def test_reference_of_one_slot_is_the_plain_lora_formula():
    """Every row on the rank-8 slot: the same as ``scale * x Aᵀ Bᵀ`` for the whole batch."""
    x, stack, _, live = make_problem(torch.float32, torch.float32)
    a, b, scale = live[2]
    with torch.inference_mode():
        got = gl.grouped_lora_reference(x, stack, torch.full((TOKENS,), 2))
    torch.testing.assert_close(got, scale * (x @ a.T) @ b.T, rtol=1e-5, atol=1e-5)


def test_grouped_lora_on_cpu_takes_the_reference_and_is_inference_only():
    x, stack, index, _ = make_problem(torch.bfloat16, torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(gl.grouped_lora(x, stack, index), gl.grouped_lora_reference(x, stack, index))
    x.requires_grad_()
    with pytest.raises(ValueError, match="^grouped_lora is inference-only"):
        gl.grouped_lora(x, stack, index)
    with torch.no_grad():
        assert gl.grouped_lora(x, stack, index).shape == (TOKENS, OUT)


def test_calls_with_wrong_shapes_or_dtypes_are_refused_in_one_line():
    x, stack, index, _ = make_problem(torch.float32, torch.float32)
    cases = {
        "x must be [tokens, 41], got (63, 40)": (x[:, :40], index),
        "index must be int64 [63], got torch.int32 (63,)": (x, index.int()),
        "index must be int64 [63], got torch.int64 (62,)": (x, index[:62]),
        "x must be fp32, bf16 or fp16, got torch.float64": (x.double(), index),
    }
    for message, (x_arg, index_arg) in cases.items():
        for function in (gl.grouped_lora_reference, gl.grouped_lora):
            with pytest.raises(ValueError) as raised:
                function(x_arg, stack, index_arg)
            assert str(raised.value) == f"grouped_lora: {message}"


def test_triton_problem_names_why_not():
    assert gl.triton_problem("cpu") == "cpu device, the kernel needs CUDA"
    assert gl.triton_problem("not-a-device").startswith("not a device:")
    if not torch.cuda.is_available():
        assert gl.triton_problem("cuda") == "CUDA not available to torch"


# --- the stack ----------------------------------------------------------------------------------


def test_put_refuses_a_rank_over_r_max_and_leaves_the_slot_alone():
    stack = gl.AdapterStack.empty(2, 4, IN, OUT)
    stack.put(0, torch.ones(4, IN), torch.ones(OUT, 4), 2.0)
    with pytest.raises(ValueError) as raised:
        stack.put(0, torch.zeros(5, IN), torch.zeros(OUT, 5), 1.0)
    assert str(raised.value) == "adapter rank 5 is over this stack's r_max 4: build the stack with r_max >= 5"
    assert (stack.a[0] == 1).all() and (stack.b[0] == 1).all() and stack.scale[0] == 2.0


def test_put_pads_with_zeros_and_overwrites_without_residue():
    _, stack, _, live = make_problem(torch.float32, torch.float32)
    a, b, scale = live[OVERWRITTEN]  # rank 3, put over a rank-8 adapter
    assert torch.equal(stack.a[OVERWRITTEN, :3], a) and (stack.a[OVERWRITTEN, 3:] == 0).all()
    assert torch.equal(stack.b[OVERWRITTEN, :, :3], b) and (stack.b[OVERWRITTEN, :, 3:] == 0).all()
    assert stack.scale[OVERWRITTEN] == scale


def test_put_and_clear_refuse_bad_slots_and_shapes_in_one_line():
    stack = gl.AdapterStack.empty(N_SLOTS, R_MAX, IN, OUT)
    a, b = torch.zeros(3, IN), torch.zeros(OUT, 3)
    cases = {
        "slot 6 is out of range: this stack has slots 0..5": lambda: stack.put(N_SLOTS, a, b, 1.0),
        "slot -1 is out of range: this stack has slots 0..5": lambda: stack.clear(-1),
        "adapter shapes lora_A (3, 40), lora_B (23, 3) do not fit this layer: expected (3, 41) and (23, 3)": (
            lambda: stack.put(0, a[:, :40], b, 1.0)
        ),
        "adapter shapes lora_A (3, 41), lora_B (23, 4) do not fit this layer: expected (3, 41) and (23, 3)": (
            lambda: stack.put(0, a, torch.zeros(OUT, 4), 1.0)
        ),
        "lora_A and lora_B must be 2-D, got shapes (3, 41, 1) and (23, 3)": lambda: stack.put(0, a[..., None], b, 1.0),
    }
    for message, call in cases.items():
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message
    assert not stack.a.any() and not stack.b.any() and not stack.scale.any()


def test_stack_refuses_tensors_that_do_not_agree():
    a, b, scale = torch.zeros(2, 4, IN), torch.zeros(2, OUT, 4), torch.zeros(2)
    gl.AdapterStack(a, b, scale)
    with pytest.raises(ValueError, match="^AdapterStack: shapes do not agree"):
        gl.AdapterStack(a, torch.zeros(2, OUT, 5), scale)
    with pytest.raises(ValueError, match="^AdapterStack: a and b must share"):
        gl.AdapterStack(a, b.half(), scale)
    with pytest.raises(ValueError, match="^AdapterStack: a and b must share"):
        gl.AdapterStack(a, b, scale.double())
    with pytest.raises(ValueError, match="^AdapterStack.empty: sizes must be positive"):
        gl.AdapterStack.empty(0, 4, IN, OUT)


# --- the Triton kernels in the interpreter -----------------------------------------------------


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The check script's JSON report (one subprocess, a few seconds)."""
    return run_in_interpreter(CHECK_SCRIPT, tmp_path_factory.mktemp("grouped_lora"))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_triton_kernels_in_interpreter_match_float64_loop(interpreted, config):
    result = interpreted["configs"][config]
    assert "failure" not in result, result["failure"]
    assert result["kernels"] == {"_shrink_kernel": 3, "_expand_kernel": 3}  # no silent torch fallback
    assert result["dtype"] == str(CONFIGS[config][0]) and result["shape"] == [TOKENS, OUT]
    dtype = x_dtype_name(config)
    assert not over_tolerance(result["error"], dtype, INTERPRETER_TOLERANCES), (result, INTERPRETER_TOLERANCES[dtype])
    assert result["zero_rows"] > 10 and result["zero_rows_exact"]
    assert result["out_of_range_zero"] and result["all_minus_one_zero"]


def test_triton_kernels_in_interpreter_loop_over_ragged_blocks(interpreted):
    result = interpreted["small_tiles"]
    assert "failure" not in result, result["failure"]
    assert result["tiles"] == [8, 16, 16]  # 41 = 16 + 16 + 9 in three shrink steps, 23 = 16 + 7 outputs
    assert result["kernels"] == {"_shrink_kernel": 3, "_expand_kernel": 3}
    assert not over_tolerance(result["error"], "float32"), result
    assert result["zero_rows_exact"] and result["out_of_range_zero"] and result["all_minus_one_zero"]


def test_interpreter_bf16_tolerance_is_still_needed(interpreted):
    """When this fails, the interpreter rounds float32 -> bf16 to nearest: use TOLERANCES for bf16 there."""
    assert interpreted["bf16_rounding"] == {"nearest": False, "truncated": True}
