"""Every row of a serving batch with its own LoRA adapter (or none), in one forward pass.

PEFT keeps the adapters (it loads, checks and deletes them; its layers hold each adapter's A, B and
scaling), but PEFT's forward applies one set of active adapters to the whole batch. For a batch whose
rows ask for different adapters, each LoRA linear layer gets an instance-level forward (the class and
transformers stay untouched) that runs the base layer once for all rows and adds each row's own delta
with `kubetune_kernels.grouped_lora` (BGMV: every groupable adapter of the layer stacked in one
`AdapterStack`, one slot each, a slot index per token; the Triton kernel on CUDA, torch elsewhere).

`Rows` decides, per forward: grouped, with a slot index per row (-1 for the base model), or PEFT's
own forward, with PEFT's active adapter. The second
is how adapters that are more than the plain delta (DoRA, a LoRA bias, other LoRA variants,
`modules_to_save`, LoRA on embeddings) are served: grouped by adapter, in forwards of their own.

The stacks copy the adapters' weights (LoRA weights are small: rank x (in + out) per layer) and are
rebuilt whenever an adapter is attached or detached, between steps, never during a forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kubetune_kernels.grouped_lora import AdapterStack, grouped_lora
from kubetune_kernels.lora import variant_problem

__all__ = ["Rows", "groupable_problem", "rebuild"]

_STACK = "_kubetune_stack"  # the AdapterStack of a wired layer (None: no groupable adapter there)


@dataclass
class Rows:
    """What the next forward computes: `grouped` on, each row adds the adapter of its slot in `slots`
    ([rows], int64; None when every row is the base model's: no delta at all); off, PEFT's own forward."""

    grouped: bool = False
    slots: torch.Tensor | None = None
    _per_token: dict[int, torch.Tensor] = field(default_factory=dict)

    def set(self, grouped: bool, slots: torch.Tensor | None = None) -> None:
        self.grouped, self.slots, self._per_token = grouped, slots, {}

    def index(self, tokens: int) -> torch.Tensor:
        """The slot of each of `tokens` rows of activations: a layer sees every position of every row,
        or (the output head, with logits_to_keep) only the last of each."""
        if tokens not in self._per_token:
            self._per_token[tokens] = self.slots.repeat_interleave(tokens // self.slots.shape[0])
        return self._per_token[tokens]


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def groupable_problem(peft_model, internal: str) -> str:
    """Why the adapter `internal` cannot be served by the grouped path (it is then served grouped by
    adapter), or the empty string."""
    from peft.tuners.lora import Linear

    config = peft_model.peft_config[internal]
    if getattr(config, "modules_to_save", None):
        return "it replaces whole modules (modules_to_save)"
    if getattr(config, "trainable_token_indices", None):
        return "it trains token embeddings (trainable_token_indices)"
    for module in lora_layers(peft_model):
        if internal in getattr(module, "lora_embedding_A", {}):
            return "LoRA on an embedding layer"
        if internal not in module.lora_A:
            continue
        if type(module) is not Linear:
            return f"LoRA on a {type(module).__name__} layer"
        problem = variant_problem(module, internal)
        if problem:
            return problem
    return ""


def rebuild(model: torch.nn.Module, rows: Rows, slots: dict[str, int]) -> None:
    """Wire every LoRA linear layer of `model` for grouped batches and stack the adapters in `slots`
    (PEFT adapter name -> slot) into it; a layer none of them touches gets no stack (delta zero)."""
    from peft.tuners.lora import Linear

    for module in lora_layers(model):
        if type(module) is not Linear:
            continue
        if "forward" not in module.__dict__:
            module.forward = _grouped_forward(module, rows)
        setattr(module, _STACK, _stack(module, slots))


def _stack(module, slots: dict[str, int]) -> AdapterStack | None:
    present = {name: slot for name, slot in slots.items() if name in module.lora_A}
    if not present:
        return None
    weight = module.get_base_layer().weight
    ranks = [module.lora_A[name].weight.shape[0] for name in present]
    stack = AdapterStack.empty(
        max(slots.values()) + 1,
        max(ranks),
        module.in_features,
        module.out_features,
        dtype=weight.dtype if weight.dtype.is_floating_point else torch.float32,
        device=weight.device,
    )
    for name, slot in present.items():
        stack.put(slot, module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name]))
    return stack


def _grouped_forward(module, rows: Rows):
    peft_forward = type(module).forward.__get__(module)

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not rows.grouped:
            return peft_forward(x, *args, **kwargs)
        result = module.base_layer(x, *args, **kwargs)
        stack = getattr(module, _STACK, None)
        if stack is None or rows.slots is None:
            return result
        flat = x.reshape(-1, x.shape[-1])
        delta = grouped_lora(flat, stack, rows.index(flat.shape[0]))
        return result + delta.view(result.shape).to(result.dtype)

    return forward
