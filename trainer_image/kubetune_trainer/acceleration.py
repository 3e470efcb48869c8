"""What `spec.hyperparameters.kernels` and `.compile` do to the model: decided once, applied to this
model instance only, and logged patch by patch, fallback by fallback, each with its reason.

`kernels: auto`:
- **the loss** — the causal LM's forward computes the next-token loss (or DPO's token
  log-probabilities) from the last hidden state in chunks of tokens, so the `[tokens, vocab]` logits
  are never held whole: Liger Kernel's fused linear cross-entropy on CUDA, kubetune's pure-torch
  chunks elsewhere (`kubetune_kernels.cross_entropy`);
- **LoRA layers** — a Llama-style MLP whose gate, up and down projections carry LoRA runs as one
  autograd Function that keeps its input and two projections for backward, not four
  intermediate-sized tensors; every other LoRA linear layer runs as one Function too
  (`kubetune_kernels.lora`). A layer the kernel cannot take at the moment of the call (adapters
  disabled for DPO's reference pass, DoRA, merged weights) runs PEFT's own forward;
- **Liger's RMSNorm and RoPE** on CUDA.

`compile`: regional `torch.compile` of each decoder layer (`auto`: on CUDA with `kernels: auto`), so
a recompile touches one layer's graph, and FSDP2's per-layer hooks and gradient checkpointing stay
outside the compiled regions.

`kernels: none` (with `compile: auto` or `never`) leaves the model exactly as PEFT built it: today's
plain recipe, bit for bit.
"""

import types
from dataclasses import dataclass, field

import torch

from kubetune.api.finetunejob import FineTuneJobSpec

# How the trainer asks a patched model for a loss instead of logits: a keyword the patched causal-LM
# forward takes, ("sum", labels) for the summed next-token cross-entropy, ("logps", labels) for the
# per-token log-probabilities of the labels (0 where a label is ignored), both over positions 1..T-1.
LOSS_KEYWORD = "kubetune_loss"
_MARK = "_kubetune_fused_loss"

# MLP classes whose forward is down(act(gate(x)) * up(x)), the shape the fused LoRA MLP computes,
# and attention classes that project one input with q_proj, k_proj and v_proj.
SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
ATTENTIONS = frozenset({"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"})
QKV = ("q_proj", "k_proj", "v_proj")
TRANSIENT = frozenset({"4-bit weight not quantised yet"})
SILU = frozenset({"silu", "swish"})


@dataclass
class Acceleration:
    """What was patched, what fell back and why, and whether (and when) decoder layers compile."""

    patched: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    compiled_layers: int = 0
    first_step_seconds: float | None = None

    def summary(self) -> str:
        parts = [", ".join(self.patched) or "no kernels"]
        if self.compiled_layers:
            parts.append(f"torch.compile of {self.compiled_layers} decoder layers")
        if self.fallbacks:
            parts.append("fell back: " + "; ".join(self.fallbacks))
        return "; ".join(parts)

    def to_wire(self) -> dict:
        return {
            "patched": self.patched,
            "fallbacks": self.fallbacks,
            "compiledLayers": self.compiled_layers,
            "firstStepSeconds": self.first_step_seconds,
        }


def accelerate(model, spec: FineTuneJobSpec, device: torch.device, strategy: str) -> Acceleration:
    """Patch `model` (the PEFT model, or the bare model of a full fine-tune) in place, before the
    strategy wraps or shards it; returns the record the trainer logs and reports."""
    h = spec.hyperparameters
    result = Acceleration()
    if h.kernels == "auto":
        lm = causal_lm(model)
        _patch_loss(lm, spec, device, strategy, result)
        _patch_liger(lm, device, result)  # first: its RoPE replaces attention forwards the QKV fusion wraps
        _patch_lora(lm, strategy, result)
    if _should_compile(h.compile, h.kernels, device):
        _compile_layers(causal_lm(model), strategy, result)
    return result


def fused_loss(model) -> bool:
    """Whether `model` (wrapped by DDP or DeepSpeed, or not) computes its loss in chunks."""
    return bool(getattr(causal_lm(unwrap(model)), _MARK, False))


def unwrap(model):
    """The model inside DDP or a DeepSpeed engine (FSDP2 shards in place: nothing to unwrap)."""
    wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine"
    return model.module if wrapped else model


def causal_lm(model):
    """The transformers causal LM inside a PEFT model (itself for a full fine-tune)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# --- the loss ----------------------------------------------------------------------------------


def loss_problem(lm, spec: FineTuneJobSpec, strategy: str) -> str | None:
    """Why the chunked loss cannot replace this model's logits, or None."""
    config = getattr(lm, "config", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if spec.method.type in ("promptTuning", "prefixTuning"):
        return f"method {spec.method.type}: PEFT builds the inputs and labels of virtual tokens itself"
    if strategy == "deepspeed-zero3":
        return "DeepSpeed ZeRO-3 gathers lm_head's weight only inside lm_head's own forward"
    if not isinstance(getattr(lm, "model", None), torch.nn.Module):
        return f"{type(lm).__name__} has no decoder at .model"
    if type(head) is not torch.nn.Linear:
        return f"lm_head is a {type(head).__name__}, not a plain linear layer (an adapter on it?)"
    for attribute in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            return f"{config.model_type} transforms its logits ({attribute})"
    return None


def _patch_loss(lm, spec: FineTuneJobSpec, device: torch.device, strategy: str, result: Acceleration) -> None:
    problem = loss_problem(lm, spec, strategy)
    if problem:
        result.fallbacks.append(f"chunked cross-entropy: {problem}")
        return
    from kubetune_kernels import cross_entropy

    summed, name = cross_entropy.linear_cross_entropy, "chunked cross-entropy (torch)"
    if device.type == "cuda":
        from kubetune_kernels import liger

        why_not = liger.liger_problem(device)
        if why_not is None:
            summed, name = liger.liger_linear_cross_entropy, "fused linear cross-entropy (Liger)"
        else:
            result.fallbacks.append(f"Liger's fused linear cross-entropy: {why_not}")
    original = lm.forward

    def forward(self, *args, **kwargs):
        request = kwargs.pop(LOSS_KEYWORD, None)
        if request is None:
            return original(*args, **kwargs)
        kind, labels = request
        return _hidden_state_loss(self, kind, labels, summed, kwargs)

    lm.forward = types.MethodType(forward, lm)
    setattr(lm, _MARK, True)
    result.patched.append(name)


# Keywords the PEFT wrapper passes down that the decoder either does not take or must not get.
_DROPPED = ("labels", "return_dict", "output_attentions", "output_hidden_states", "logits_to_keep")


def _hidden_state_loss(lm, kind: str, labels: torch.Tensor, summed, kwargs: dict):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from kubetune_kernels import cross_entropy

    inputs = {k: v for k, v in kwargs.items() if k not in _DROPPED and v is not None}
    hidden = lm.model(**inputs).last_hidden_state
    hidden = hidden[:, -labels.shape[1] :][:, :-1]  # prompt tuning would prepend virtual tokens
    targets = labels[:, 1:]
    head = lm.get_output_embeddings()
    if kind == "sum":
        loss = summed(hidden, head.weight, targets, bias=head.bias)
    else:
        loss = cross_entropy.linear_token_logps(hidden, head.weight, targets, bias=head.bias)
    return CausalLMOutputWithPast(loss=loss)


# --- LoRA layers -------------------------------------------------------------------------------


def _patch_lora(lm, strategy: str, result: Acceleration) -> None:
    layers = [m for m in lm.modules() if _is_lora_linear(m)]
    if not layers:
        return
    if strategy == "deepspeed-zero3":
        result.fallbacks.append("LoRA kernels: DeepSpeed ZeRO-3 gathers a weight only inside its own layer's forward")
        return
    from kubetune_kernels import lora

    # A lasting reason turns the kernels off for the run; a 4-bit weight that bitsandbytes quantises
    # only when the strategy moves it to the GPU is checked again at every call.
    problems = (why for m in layers for w, why in [lora.from_peft(m)] if w is None and why not in TRANSIENT)
    first_problem = next(problems, None)
    if first_problem:
        result.fallbacks.append(f"LoRA kernels: {first_problem}")
        return
    mlps = [m for m in lm.modules() if _fusable_mlp(m, lm.config)]
    attentions = [m for m in lm.modules() if _fusable_attention(m)]
    for mlp in mlps:
        mlp.forward = types.MethodType(_fused_mlp_forward(mlp.forward), mlp)
    for layer in layers:
        layer.forward = types.MethodType(_lora_linear_forward(layer.forward), layer)
    for attention in attentions:
        _fuse_qkv(attention)
    if mlps:
        result.patched.append(f"fused LoRA MLP x{len(mlps)}")
    if attentions:
        result.patched.append(f"fused LoRA QKV x{len(attentions)}")
    result.patched.append(f"LoRA linear x{len(layers)}")


def _is_lora_linear(module) -> bool:
    from peft.tuners.lora import LoraLayer

    # Exactly PEFT's LoRA linear layer and its 4-bit twin: AdaLoRA's and other subclasses compute
    # something else.
    return isinstance(module, LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit")


def _fusable_mlp(module, config) -> bool:
    if type(module).__name__ not in SWIGLU_MLPS or getattr(config, "hidden_act", None) not in SILU:
        return False
    return all(_is_lora_linear(getattr(module, p, None)) for p in ("gate_proj", "up_proj", "down_proj"))


def _fusable_attention(module) -> bool:
    return type(module).__name__ in ATTENTIONS and all(_is_lora_linear(getattr(module, p, None)) for p in QKV)


class _Projected:
    """The q, k and v of the input an attention forward is running on, computed in one Function
    before that forward and handed to its q_proj, k_proj and v_proj calls: the attention code
    itself (transformers', or Liger's RoPE copy of it) stays as it is."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.outputs: tuple = ()


def _fuse_qkv(attention) -> None:
    from kubetune_kernels import lora

    projected, original = _Projected(), attention.forward

    def forward(self, hidden_states, *args, **kwargs):
        weights = [lora.from_peft(getattr(self, p))[0] for p in QKV]
        if any(w is None for w in weights):
            return original(hidden_states, *args, **kwargs)
        projected.x, projected.outputs = hidden_states, lora.lora_qkv(hidden_states, *weights, training=self.training)
        try:
            return original(hidden_states, *args, **kwargs)
        finally:
            projected.x, projected.outputs = None, ()

    def projection(index: int, fallback):
        def forward(self, x, *args, **kwargs):
            if projected.x is x and not args and not kwargs:
                return projected.outputs[index]
            return fallback(x, *args, **kwargs)

        return forward

    attention.forward = types.MethodType(forward, attention)
    for index, name in enumerate(QKV):
        layer = getattr(attention, name)
        layer.forward = types.MethodType(projection(index, layer.forward), layer)


def _fused_mlp_forward(original):
    from kubetune_kernels import lora

    def forward(self, x):
        weights = [lora.from_peft(getattr(self, p))[0] for p in ("gate_proj", "up_proj", "down_proj")]
        if any(w is None for w in weights):  # adapters disabled (DPO's reference), merged, ...
            return original(x)
        return lora.lora_mlp(x, *weights, training=self.training)

    return forward


def _lora_linear_forward(original):
    from kubetune_kernels import lora

    def forward(self, x, *args, **kwargs):
        weights = lora.from_peft(self)[0] if not args and not kwargs else None
        if weights is None:
            return original(x, *args, **kwargs)
        return lora.lora_linear(x, weights, training=self.training)

    return forward


# --- Liger's RMSNorm and RoPE ----------------------------------------------------------------------


def _patch_liger(lm, device: torch.device, result: Acceleration) -> None:
    if device.type != "cuda":
        return  # Triton's kernels need a GPU; nothing to say on a CPU run beyond the loss line
    from kubetune_kernels import liger

    why_not = liger.liger_problem(device) or liger.liger_model_problem(lm)
    if why_not:
        result.fallbacks.append(f"Liger RMSNorm/RoPE: {why_not}")
        return
    result.patched.extend(f"Liger {name}" for name in liger.apply_liger(lm, rms_norm=True, rope=True, swiglu=False))


# --- compilation -------------------------------------------------------------------------------


def _should_compile(setting: str, kernels: str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda" and kernels == "auto"
    return setting == "always"


def decoder_layers(lm) -> list:
    layers = getattr(getattr(lm, "model", None), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def _compile_layers(lm, strategy: str, result: Acceleration) -> None:
    layers = decoder_layers(lm)
    if not layers:
        result.fallbacks.append(f"torch.compile: {type(lm).__name__} has no decoder layers at .model.layers")
        return
    if strategy.startswith("deepspeed"):
        result.fallbacks.append("torch.compile: DeepSpeed's engine hooks are not traced by regional compilation")
        return
    for layer in layers:
        layer.compile()  # in place: FSDP2's hooks and checkpointing wrap the module, not the graph
    result.compiled_layers = len(layers)
