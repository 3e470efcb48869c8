"""Checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the trainable parameters (the adapter, or every weight for a full fine-tune),
the optimizer and scheduler, each rank's random number generators, the trainer state (step,
data fingerprint) and which strategy wrote it (strategy.json). Weights and optimizer state come in
the strategy's format: replicated (DDP: rank 0 writes trainable.safetensors + optimizer.pt), dcp
(FSDP: every rank writes its shards with torch.distributed.checkpoint), or DeepSpeed's own.
The data position needs no saving: the order of examples is a pure function of (seed, epoch,
step), so resuming at step N reads exactly the batches an unbroken run would have.
Checkpoints are written into a staging folder and published atomically by the storage layer. The
staging folder is one for all ranks when the output's local folder is shared (one node, or pvc://);
for s3:// across nodes each node has its own, holding its ranks' files, and the nodes publish the
union together (train.save_checkpoint), so a resuming node fetches every rank's files.
"""

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kubetune.contract import CHECKPOINTS_DIR as CHECKPOINTS


@dataclass
class TrainerState:
    step: int
    fingerprint: str
    global_batch_size: int
    history: list[dict] = field(default_factory=list)  # one entry per logged step: step, loss, lr, ...
    resumes: int = 0  # times the run went on from a checkpoint (preemptions, retried failures)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINTS}/step-{step:08d}"


def step_of(name: str) -> int:
    return int(name.rsplit("step-", 1)[1])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_files(folder: Path, rank: int) -> None:
    """What differs per rank: its random number generators (dropout masks)."""
    torch.save(rng_state(), folder / f"rng-rank{rank}.pt")


def save_trainer_files(folder: Path, scheduler, state: TrainerState, layout: dict) -> None:
    """What every strategy shares; written by rank 0 only."""
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    (folder / "strategy.json").write_text(json.dumps(layout))


def read_layout(folder: Path) -> dict:
    """How the checkpoint was written; checkpoints from before strategies existed are DDP's."""
    path = folder / "strategy.json"
    return json.loads(path.read_text()) if path.exists() else {"strategy": "ddp", "format": "replicated"}


def load_trainer_files(folder: Path, scheduler, rank: int) -> TrainerState:
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    rng_file = folder / f"rng-rank{rank}.pt"
    if rng_file.exists():  # absent when resuming with more ranks than before
        restore_rng(torch.load(rng_file, weights_only=False))
    return TrainerState(**json.loads((folder / "trainer_state.json").read_text()))


# --- replicated (DDP, one process) -------------------------------------------------------------


def save_replicated(folder: Path, model, optimizer) -> None:
    """Every rank holds the same weights and optimizer state; rank 0 writes them."""
    save_file(trainable_state(model), str(folder / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")


def load_replicated(folder: Path, model, optimizer) -> None:
    weights = load_file(str(folder / "trainable.safetensors"))
    parameters = dict(model.named_parameters())
    missing = [name for name in weights if name not in parameters]
    if missing:
        raise ValueError(f"checkpoint {folder} does not match the model (unknown parameters {missing[:3]})")
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))


# --- sharded (FSDP): torch.distributed.checkpoint ----------------------------------------------


def _sharded_state(model, optimizer) -> dict:
    """Trainable parameters and optimizer state keyed by parameter name (not position), as the
    local shards of DTensors: DCP writes each rank's shards and re-shards them on load."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": optim}


def save_sharded(folder: Path, model, optimizer) -> None:
    """Collective: every rank writes its shards into the staging folder (its node's own, when the
    nodes share none: DCP's coordinator, rank 0, writes .metadata, each rank its __RANK_0.distcp)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(folder / "dcp"))


def load_sharded(folder: Path, model, optimizer) -> None:
    """Collective. Works with another world size than the one that saved (DCP re-shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _sharded_state(model, optimizer)  # the shapes and shards to fill
    dcp.load(state, checkpoint_id=str(folder / "dcp"))
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights are not in it
    result = set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    missing = [name for name in result.missing_keys if name in state["model"]]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {folder} does not match the model ({(missing + result.unexpected_keys)[:3]})")
