"""Liger Kernel on CUDA: RMSNorm, RoPE, SwiGLU and fused linear cross-entropy for one model.

Liger Kernel (``liger-kernel``, pinned) already ships well-tested Triton kernels for these
operations, so kubetune does not rewrite them; this module only decides whether they can run
and applies them to *one model instance*.

Why not simply call ``liger_kernel.transformers.apply_liger_kernel_to_llama(model=model)``?
In liger-kernel 0.8.5 that function (and ``_apply_liger_kernel_to_instance``, which dispatches
to it) patches the instance *and* the ``transformers`` modeling module: it rebinds
``modeling_llama.LlamaRMSNorm``, ``modeling_llama.LlamaMLP`` and, for RoPE, the module-level
function ``modeling_llama.apply_rotary_pos_emb``, which every ``LlamaAttention.forward`` in the
process looks up at call time. A reference model, or a second model built later in the same
process, would silently run Liger's kernels too (and fail outright on CPU tensors). So:

* RMSNorm and SwiGLU: we call Liger's own per-architecture function with ``model=`` (its
  instance patching binds ``LigerRMSNorm.forward`` / ``LigerSwiGLUMLP.forward`` onto the existing
  modules, PEFT ``ModulesToSaveWrapper`` included) and then put back every module-level name it
  rebound, so only this instance changes.
* RoPE: Liger has no instance-level RoPE patch, only the global one. We give each attention
  module of this instance its own ``forward``: the class's function with the same code, whose
  globals are a copy of the modeling module's with ``apply_rotary_pos_emb`` set to Liger's. The
  copy is taken when ``apply_liger`` runs, so a *later* global patch of that modeling module
  (for example another library rebinding ``eager_attention_forward``) does not reach the patched
  instance; patch globals first, then call ``apply_liger``.
* Fused linear cross-entropy is not patched into the model's ``forward`` at all: the trainer's
  loss path calls :func:`liger_linear_cross_entropy` on the final hidden states itself, with
  the same semantics as the pure-torch ``kubetune_kernels.cross_entropy.linear_cross_entropy``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import types

import torch
from torch import nn

from .devices import cuda_problem

logger = logging.getLogger(__name__)

# Architectures whose Liger function has the Llama shape: RMSNorm modules (norm,
# input_layernorm, post_attention_layernorm, and Qwen3's q_norm/k_norm), a gate/up/down SwiGLU
# MLP, and an attention forward that calls the module-level ``apply_rotary_pos_emb``.
# Others Liger supports (Gemma's offset RMSNorm, GPT-OSS's RoPE, the VL models' M-RoPE) need
# their own care and are left eager until someone wires and tests them.
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("transformers.models.llama.modeling_llama", "apply_liger_kernel_to_llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "apply_liger_kernel_to_mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "apply_liger_kernel_to_qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "apply_liger_kernel_to_qwen3"),
}

_ROPE_NAME = "apply_rotary_pos_emb"


def liger_problem(device: torch.device | str, *, interpret_ok: bool = False) -> str | None:
    """Why Liger's Triton kernels cannot run on ``device``, or None when they can.

    The answer is one short phrase for the trainer's log line ("no CUDA device", ...). It never
    raises. ``interpret_ok`` lets the tests accept a CPU device when ``TRITON_INTERPRET=1`` is
    set, because Triton's interpreter then runs the kernels on CPU tensors (slowly; never for
    training). Triton reads that variable when a kernel is defined, so it only counts when it was
    set before ``liger_kernel`` was imported: the tests run the interpreter in a subprocess.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        return f"not a device: {exc}"
    interpreted = interpret_ok and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not (interpreted and device.type == "cpu"):
        return "no CUDA device" if device.type == "cpu" else f"{device.type} device, Liger needs CUDA"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA not available to torch"
    imported = _import_problem()  # once per process: importing liger_kernel takes seconds
    if imported or device.type == "cpu":  # a CPU device gets here only under the interpreter
        return imported
    return cuda_problem(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _import_problem() -> str | None:
    """Import triton and liger_kernel once; the reason they fail does not change in a process."""
    for name in ("triton", "liger_kernel"):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a broken install is a reason, not a crash
            return f"{name} not importable: {type(exc).__name__}: {exc}"
    return None


def liger_model_problem(model: nn.Module) -> str | None:
    """Why :func:`apply_liger` would leave this model's architecture eager, or None.

    Looks only at the architecture (``config.model_type``), not at the device; see
    :func:`liger_problem` for that. PEFT-wrapped models are judged by their base model.
    """
    base = _base_model(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if not model_type:
        return f"{type(base).__name__} has no config.model_type"
    if model_type not in _ARCHITECTURES:
        supported = ", ".join(sorted(_ARCHITECTURES))
        return f"Liger is not wired for model type {model_type!r} (supported: {supported})"
    return None


def apply_liger(
    model: nn.Module, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = False, interpret_ok: bool = False
) -> list[str]:
    """Patch this one model instance with Liger's kernels; return what was patched.

    The result holds short names for the log, e.g. ``["rms_norm x17", "rope x8"]``; an empty
    list means nothing was patched (unsupported architecture, no CUDA device, Liger not
    importable): the caller logs :func:`liger_model_problem` / :func:`liger_problem` as the reason
    it fell back. Nothing global changes: other models in the process keep their eager modules
    (see the module docstring for how, and for the one caveat about RoPE).

    ``swiglu`` is off by default: with LoRA on gate/up/down the MLP is replaced by kubetune's
    fused LoRA MLP instead, and Liger's SwiGLU only fuses the activation. Turn it on for full
    fine-tunes. It is skipped (and logged) when the config's activation is not SiLU, because
    Liger's SwiGLU hard-codes SiLU. ``interpret_ok`` is for tests only, as in :func:`liger_problem`.
    """
    base = _base_model(model)
    problem = liger_model_problem(base) or liger_problem(_device_of(base), interpret_ok=interpret_ok)
    if problem:
        logger.info("Liger not applied: %s", problem)
        return []
    module_name, function_name = _ARCHITECTURES[base.config.model_type]
    modeling = importlib.import_module(module_name)
    if swiglu and getattr(base.config, "hidden_act", None) not in ("silu", "swish"):
        logger.info("Liger SwiGLU skipped: activation %r is not SiLU", getattr(base.config, "hidden_act", None))
        swiglu = False
    patched: list[str] = []
    if rms_norm or swiglu:
        _apply_library_instance_patch(base, modeling, function_name, rms_norm=rms_norm, swiglu=swiglu)
        patched += _count_bound(base, rms_norm=rms_norm, swiglu=swiglu)
    if rope:
        count = _patch_rope_per_instance(base, modeling)
        if count:
            patched.append(f"rope x{count}")
    return patched


def liger_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """fp32 sum over ``labels != ignore_index`` of cross-entropy(hidden @ weightᵀ + bias, labels).

    Liger's fused linear cross-entropy: the ``[tokens, vocab]`` logits exist one chunk at a
    time, and the gradients of ``hidden``, ``weight`` and ``bias`` are computed in the forward
    pass (so backward is a scale). Same semantics as the pure-torch
    ``kubetune_kernels.cross_entropy.linear_cross_entropy``: the caller divides by its own token
    count, which keeps gradient accumulation across micro-batches exact. ``hidden`` is
    ``[..., H]`` and ``labels`` the matching ``[...]``; labels are *not* shifted here.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)} without its last dim")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        bias=bias,
        ignore_index=ignore_index,
        reduction="sum",
    )
    return loss.float()


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (whose LoRA layers live inside it)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _apply_library_instance_patch(base: nn.Module, modeling, function_name: str, *, rms_norm: bool, swiglu: bool):
    """Run Liger's instance patch, then undo its module-level rebinding (see module docstring)."""
    from liger_kernel.transformers import monkey_patch

    before = dict(vars(modeling))
    try:
        getattr(monkey_patch, function_name)(
            rope=False,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
            rms_norm=rms_norm,
            swiglu=swiglu,
            model=base,
        )
    finally:
        _restore_namespace(modeling, before)


def _restore_namespace(module: types.ModuleType, before: dict) -> None:
    namespace = vars(module)
    for name in [name for name in namespace if name not in before]:
        del namespace[name]
    for name, value in before.items():
        if namespace.get(name) is not value:
            namespace[name] = value


def _count_bound(base: nn.Module, *, rms_norm: bool, swiglu: bool) -> list[str]:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    wanted = {"rms_norm": (rms_norm, LigerRMSNorm.forward), "swiglu": (swiglu, LigerSwiGLUMLP.forward)}
    names = []
    for name, (enabled, function) in wanted.items():
        count = sum(_bound_function(module) is function for module in base.modules()) if enabled else 0
        if count:
            names.append(f"{name} x{count}")
    return names


def _bound_function(module: nn.Module):
    return getattr(module.__dict__.get("forward"), "__func__", None)


def _patch_rope_per_instance(base: nn.Module, modeling) -> int:
    """Give each attention module of ``base`` a forward that calls Liger's RoPE; return how many."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    clones: dict[type, types.FunctionType] = {}
    count = 0
    for module in base.modules():
        cls = type(module)
        if cls.__module__ != modeling.__name__ or not _calls_global_rope(cls.forward, modeling):
            continue
        if "forward" in module.__dict__:
            if _is_clone_with(_bound_function(module), cls.forward, liger_rotary_pos_emb):
                count += 1  # patched by an earlier call
            else:
                logger.info("Liger RoPE skipped on %s: its forward is already replaced on the instance", cls.__name__)
            continue
        if cls not in clones:
            clones[cls] = _with_global(cls.forward, modeling, _ROPE_NAME, liger_rotary_pos_emb)
        module.forward = types.MethodType(clones[cls], module)
        count += 1
    return count


def _is_clone_with(bound, function: types.FunctionType, rope) -> bool:
    return getattr(bound, "__code__", None) is function.__code__ and bound.__globals__.get(_ROPE_NAME) is rope


def _calls_global_rope(function, modeling) -> bool:
    """True for a plain function of ``modeling`` that looks up ``apply_rotary_pos_emb`` globally.

    A decorated forward (``__wrapped__``) would hide the real code, so it is left alone.
    """
    return (
        isinstance(function, types.FunctionType)
        and not hasattr(function, "__wrapped__")
        and function.__globals__ is vars(modeling)
        and _ROPE_NAME in function.__code__.co_names
    )


def _with_global(function: types.FunctionType, modeling, name: str, value) -> types.FunctionType:
    namespace = dict(vars(modeling))
    namespace[name] = value
    clone = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    clone.__kwdefaults__ = function.__kwdefaults__
    clone.__qualname__ = function.__qualname__
    clone.__doc__ = function.__doc__
    return clone
