"""Distributed strategies: how the model, its gradients and its optimizer state are spread over ranks.

The recipe talks to one small interface and never to DDP, FSDP or DeepSpeed directly:

    strategy = build(name, spec, env, device)
    model, optimizer = strategy.prepare(model, make_optimizer)   # what the loop calls / schedules
    with strategy.no_sync(not last_micro_batch): strategy.backward(loss)
    strategy.clip(max_norm); strategy.step(); strategy.grad_norm; strategy.zero_grad()
    strategy.save_state(folder) / strategy.load_state(folder)    # every rank, one shared folder
    strategy.save_pretrained(folder or None)                     # every rank; rank 0 writes

Every strategy keeps the recipe's arithmetic: the recipe passes `loss_sum * world_size /
global_tokens` to `backward`, and each strategy averages gradients over ranks (DDP, FSDP's
reduce-scatter, ZeRO's reduction all divide by the world size), so every rank's gradient is that of
the mean over the global batch's trainable tokens, as in one process. DeepSpeed's own division by
the accumulation steps is switched off (`scale_wrt_gas=False`) for the same reason.

- ddp (and one process): a full replica per rank; gradients all-reduced once per optimizer step.
- fsdp: FSDP2 `fully_shard` per decoder layer, then the root; parameters, gradients and AdamW
  state are sharded (DTensor, dim 0). Checkpoints are `torch.distributed.checkpoint` (DCP) shards
  written by every rank, which DCP re-shards on load, so a run may resume with another world size.
- deepspeed-zero2 / deepspeed-zero3: `deepspeed.initialize` around the recipe's own AdamW (so the
  update is the same arithmetic as DDP's); checkpoints are DeepSpeed's own, one file per rank, and
  must be resumed with the same world size.
"""

import contextlib
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from . import checkpoint
from .distributed import DistEnv

# Methods a strategy cannot train. AdaLoRA reallocates ranks from each parameter's full gradient,
# which sharded strategies never hold (ZeRO keeps gradients in its own buffers); a 4-bit base
# (qlora) cannot be cut into FSDP or ZeRO-3 shards. ZeRO-2 leaves frozen weights alone, so qlora works.
UNSUPPORTED_METHODS = {
    "fsdp": ("adalora", "qlora"),
    "deepspeed-zero2": ("adalora",),
    "deepspeed-zero3": ("adalora", "qlora"),
}


def resolve(requested: str, planned: str, method: str, world_size: int) -> str:
    """The strategy actually used. `auto` is the plan's pick when there are several processes
    (one process has nothing to shard across: ddp, i.e. plain training), falling back to ddp when the
    pick cannot train the method. An explicit strategy is honoured even in one process (a single
    GPU with deepspeed-zero3 and offload cpu trains models that do not fit otherwise)."""
    if requested != "auto":
        if method in UNSUPPORTED_METHODS.get(requested, ()):
            raise ValueError(
                f"method {method} cannot be trained with distributed.strategy {requested}; use ddp (or auto)"
            )
        return requested
    if world_size == 1 or method in UNSUPPORTED_METHODS.get(planned, ()):
        return "ddp"
    return planned


def build(name: str, spec, env: DistEnv, device: torch.device) -> "Strategy":
    classes = {"ddp": DDP, "fsdp": FSDP, "deepspeed-zero2": DeepSpeed, "deepspeed-zero3": DeepSpeed}
    return classes[name](name, spec, env, device)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Strategy(ABC):
    """The interface; see the module docstring."""

    checkpoint_format = "replicated"  # what save_state writes; resume refuses another format

    def __init__(self, name: str, spec, env: DistEnv, device: torch.device):
        self.name, self.spec, self.env, self.device = name, spec, env, device
        self.module = None  # the PEFT / transformers model, unwrapped (attributes, saving)
        self.model = None  # what the loop calls: the module, or its wrapper
        self.optimizer = None  # the torch optimizer (the scheduler adjusts its learning rate)

    @abstractmethod
    def prepare(self, model, make_optimizer): ...

    def no_sync(self, skip: bool):
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def clip(self, max_norm: float) -> None:
        """Clip the gradients' global norm to max_norm (0: no clipping)."""
        ...

    @abstractmethod
    def step(self) -> None: ...

    @property
    @abstractmethod
    def grad_norm(self) -> float | None:
        """The global gradient norm of the last step, before clipping (same on every rank)."""
        ...

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def save_state(self, folder: Path) -> None: ...

    @abstractmethod
    def load_state(self, folder: Path) -> None: ...

    @abstractmethod
    def save_pretrained(self, folder: Path | None) -> None: ...

    @property
    def gathers_to_merge(self) -> bool:
        """True when no rank holds the whole model, so merging reloads the base from disk."""
        return False


# --- torch-native: DDP and FSDP ----------------------------------------------------------------


class _TorchStrategy(Strategy):
    """The update both torch strategies share: backward, clip, AdamW step, fp16 loss scaling."""

    def __init__(self, *args):
        super().__init__(*args)
        fp16_on_gpu = self.spec.hyperparameters.precision == "fp16" and self.device.type == "cuda"
        # bf16 and fp32 need no loss scaling; with FSDP, DTensor all-reduces the scaler's inf check
        self.scaler = torch.amp.GradScaler("cuda") if fp16_on_gpu else None
        self._grad_norm = None

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip(self, max_norm):
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # With no limit the norm is still measured (the gradients are multiplied by exactly 1).
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else math.inf)
        self._grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor

    @property
    def grad_norm(self):
        return self._grad_norm

    def step(self):
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)


class DDP(_TorchStrategy):
    """A full replica per rank (or plain training in one process)."""

    def prepare(self, model, make_optimizer):
        if self.spec.method.type != "qlora":  # bitsandbytes placed the 4-bit weights already
            model.to(self.device)
        self.module = self.model = model
        if self.env.distributed:
            device_ids = [self.env.local_rank] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.optimizer = make_optimizer(trainable_parameters(model))
        return self.model, self.optimizer

    def no_sync(self, skip):
        if skip and isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return self.model.no_sync()  # accumulate locally; all-reduce on the last micro-batch
        return contextlib.nullcontext()

    def save_state(self, folder):
        if self.env.is_main:  # every rank holds the same weights and optimizer state
            checkpoint.save_replicated(folder, self.module, self.optimizer)

    def load_state(self, folder):
        checkpoint.load_replicated(folder, self.module, self.optimizer)

    def save_pretrained(self, folder):
        if folder is not None:
            self.module.save_pretrained(folder, safe_serialization=True)


class FSDP(_TorchStrategy):
    """FSDP2: every decoder layer is one sharded group (all-gathered for its forward and backward,
    gradients reduce-scattered), the rest (embeddings, head, prompt encoder) is the root group.

    Gradients are reduce-scattered after every micro-batch rather than accumulated unsharded (as
    DDP's no_sync would): accumulating full gradients would cost the memory sharding saves.
    Mixed precision: parameters are all-gathered and computed in bf16/fp16, gradients reduced in
    fp32, and the sharded fp32 parameters are what AdamW updates. gloo (CPU) all-gathers and
    reduce-scatters bf16 as well (checked with torch 2.15), so CPU runs use the same policy.
    offload cpu keeps the shards, gradients and optimizer step on the host (CPUOffloadPolicy);
    it needs GPUs, since on a CPU-only run everything is on the host already."""

    checkpoint_format = "dcp"

    def prepare(self, model, make_optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        _ensure_process_group(self.env, self.device)
        mesh = init_device_mesh(self.device.type, (self.env.world_size,))
        options = {"mesh": mesh, "mp_policy": self._mixed_precision(), "offload_policy": self._offload()}
        for layer in decoder_layers(model):
            fully_shard(layer, **options)
        fully_shard(model, **options)  # moves the shards to the mesh's device, layer by layer
        self.module = self.model = model  # fully_shard changes the class in place; no wrapper
        self.optimizer = make_optimizer(trainable_parameters(model))
        return self.model, self.optimizer

    def _mixed_precision(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        precision = self.spec.hyperparameters.precision
        if precision == "fp32":
            return MixedPrecisionPolicy()
        from .methods import DTYPES

        return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)

    def _offload(self):
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        if self.spec.distributed.offload == "cpu" and self.device.type == "cuda":
            return CPUOffloadPolicy()
        return OffloadPolicy()

    def save_state(self, folder):
        checkpoint.save_sharded(folder, self.model, self.optimizer)

    def load_state(self, folder):
        checkpoint.load_sharded(folder, self.model, self.optimizer)

    def save_pretrained(self, folder):
        """Gather the full (trainable, for adapters) state on rank 0's CPU, and let PEFT or
        transformers write an ordinary folder from it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        adapter = self.spec.method.is_adapter
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter)
        state = get_model_state_dict(self.model, options=options)  # collective; empty except on rank 0
        with _unsharded_root(self.model, self.spec.method):
            if folder is not None:
                self.module.save_pretrained(folder, state_dict=state, safe_serialization=True)

    @property
    def gathers_to_merge(self):
        return True


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the classes transformers never splits across
    devices (`_no_split_modules`, e.g. LlamaDecoderLayer), else the longest ModuleList."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def _unsharded_root(model, method):
    """Prompt learning: PEFT saves the virtual tokens by running the prompt encoder (part of the
    root group), which needs its full weights; every rank must take part in the all-gather."""
    if method.type not in ("promptTuning", "prefixTuning"):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# --- DeepSpeed ZeRO ----------------------------------------------------------------------------


class DeepSpeed(Strategy):
    """ZeRO stage 2 (optimizer state and gradients sharded) or 3 (parameters too), through
    `deepspeed.initialize` with a config built from the spec. The optimizer is the recipe's torch
    AdamW, which ZeRO drives on its fp32 partitions (with offload cpu too, where DeepSpeed would
    prefer its compiled DeepSpeedCPUAdam; `zero_force_ds_cpu_optimizer: false` allows that), and
    the recipe's scheduler adjusts the learning rate of the same parameter groups.
    Clipping is the engine's (`gradient_clipping`), over the global norm of all partitions."""

    @property
    def stage(self) -> int:
        return 3 if self.name == "deepspeed-zero3" else 2

    @property
    def checkpoint_format(self):
        return self.name

    def prepare(self, model, make_optimizer):
        _ensure_process_group(self.env, self.device)
        env = {"RANK": self.env.rank, "LOCAL_RANK": self.env.local_rank, "WORLD_SIZE": self.env.world_size}
        for name, value in env.items():
            os.environ.setdefault(name, str(value))  # DeepSpeed reads them; absent in one process without torchrun
        deepspeed = import_deepspeed()
        self.optimizer = make_optimizer(trainable_parameters(model))
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.config(model.config))
        self.module, self.model, self.engine = model, engine, engine
        return self.model, self.optimizer

    def config(self, model_config) -> dict:
        h, offload = self.spec.hyperparameters, self.spec.distributed.offload == "cpu"
        hidden = getattr(model_config, "hidden_size", 4096)
        zero = {
            "stage": self.stage,
            "overlap_comm": self.device.type == "cuda",
            "contiguous_gradients": True,
            "reduce_bucket_size": hidden * hidden,
        }
        if self.stage == 3:
            # Hugging Face's "auto" values: small tensors (norms, biases) stay whole on every rank
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
            zero["stage3_param_persistence_threshold"] = 10 * hidden
        if offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
            if self.stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": self.device.type == "cuda"}
        return {
            "train_batch_size": h.global_batch_size,
            "train_micro_batch_size_per_gpu": h.micro_batch_size,
            "gradient_accumulation_steps": h.global_batch_size // (h.micro_batch_size * self.env.world_size),
            "gradient_clipping": h.max_grad_norm,  # 0 disables it
            "zero_optimization": zero,
            "bf16": {"enabled": h.precision == "bf16"},
            "fp16": {"enabled": h.precision == "fp16", "initial_scale_power": 16},
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }

    def no_sync(self, skip):
        # The recipe owns accumulation: only its last micro-batch is the boundary where
        # engine.step() updates. ZeRO reduces (and partitions) every micro-batch's gradients.
        self.engine.set_gradient_accumulation_boundary(not skip)
        return contextlib.nullcontext()

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)  # the recipe already divided by the global tokens

    def clip(self, max_norm):
        pass  # the engine clips inside step() (`gradient_clipping`)

    def step(self):
        self.engine.step()  # unscale, clip, AdamW on the partitions, zero the gradients

    @property
    def grad_norm(self):
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def zero_grad(self):
        pass

    def save_state(self, folder):
        # model (without frozen weights) + each rank's optimizer partition, by every rank
        self.engine.save_checkpoint(
            str(folder / "deepspeed"), tag="state", save_latest=False, exclude_frozen_parameters=True
        )

    def load_state(self, folder):
        path, _ = self.engine.load_checkpoint(
            str(folder / "deepspeed"),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise ValueError(f"{folder}: no DeepSpeed checkpoint there")

    def save_pretrained(self, folder):
        """The fp32 master weights of the trainable parameters (ZeRO-2 keeps the module's copy
        in bf16/fp16; ZeRO-3 holds only a partition), gathered one tensor at a time."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, parameter in self.module.named_parameters():
            if parameter.requires_grad:
                full = safe_get_full_fp32_param(parameter)  # collective; only rank 0 keeps a copy
                if folder is not None:
                    state[name] = (full if full is not None else parameter.detach()).cpu()
        if folder is not None and not self.spec.method.is_adapter:  # a full fine-tune saves persistent buffers too
            named = dict(self.module.named_parameters())
            state |= {k: v.cpu() for k, v in self.module.state_dict().items() if k not in named and v.numel()}
        with _gathered_prompt_encoder(self.module, self.spec.method, self.stage):  # collective too
            if folder is not None:
                self.module.save_pretrained(folder, state_dict=state, safe_serialization=True)

    @property
    def gathers_to_merge(self):
        return self.stage == 3


@contextlib.contextmanager
def _gathered_prompt_encoder(module, method, stage: int):
    """Prompt learning under ZeRO-3: PEFT runs the prompt encoder to save the virtual tokens."""
    if stage != 3 or method.type not in ("promptTuning", "prefixTuning"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.prompt_encoder.parameters()), modifier_rank=None):
        yield


def import_deepspeed():
    """DeepSpeed picks its accelerator when first imported: CPU (gloo, its own shared-memory
    all-reduce) unless there is a GPU. `kubetune train` sets DS_ACCELERATOR already; this covers
    the recipe called directly."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    return deepspeed


def _ensure_process_group(env: DistEnv, device: torch.device) -> None:
    """FSDP and DeepSpeed need a process group even alone (one GPU with offload): a one-rank one."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=env.rank, world_size=env.world_size)


def describe(strategy: Strategy) -> dict:
    """What the checkpoint records about how it was written."""
    return {"strategy": strategy.name, "format": strategy.checkpoint_format, "worldSize": strategy.env.world_size}


def check_resumable(strategy: Strategy, written: dict, name: str) -> None:
    """A checkpoint is resumed by the same kind of strategy; DeepSpeed's also by as many ranks."""
    fmt = written.get("format", "replicated")
    if fmt != strategy.checkpoint_format:
        raise ValueError(
            f"checkpoint {name} was written by strategy {written.get('strategy', 'ddp')} ({fmt} format) and cannot be "
            f"resumed with strategy {strategy.name}; use the same distributed.strategy, or write to a new output URI"
        )
    size = written.get("worldSize", strategy.env.world_size)
    if fmt.startswith("deepspeed") and size != strategy.env.world_size:
        raise ValueError(
            f"checkpoint {name} holds {size} DeepSpeed optimizer partitions; resume it with {size} processes, not "
            f"{strategy.env.world_size}"
        )
