"""The process group, from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

One launcher path: a single process without torchrun is simply world size 1, no process group.
A node is one pod (one torchrun agent): its processes share a local disk, which other nodes do not
see, so work on local files (a download, a staging folder) is done once per node, by local rank 0.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kubetune.contract import ENV_NODE_RANK


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None = None  # processes on this node; None: all of them (one node)
    node_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        """torchrun sets LOCAL_WORLD_SIZE and GROUP_RANK (the node's rank; NODE_RANK is what the
        operator gives the launcher, the same number)."""
        rank = int(os.environ.get("RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
        node = os.environ.get("GROUP_RANK") or os.environ.get(ENV_NODE_RANK)
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            local_world_size=local_world_size,
            node_rank=int(node) if node else rank // max(1, local_world_size),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process of this node: the one that does this node's work on local files."""
        return self.local_rank == 0

    @property
    def multi_node(self) -> bool:
        """Whether the run spans several nodes (so several local disks)."""
        return self.world_size > (self.local_world_size or self.world_size)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def init(self) -> None:
        """nccl between GPUs, gloo on CPU."""
        if not self.distributed or dist.is_initialized():
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if not dist.is_initialized():
            return [value]
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values

    def sum(self, value: float) -> float:
        """Sum a number over all ranks (identity when alone)."""
        if not dist.is_initialized():
            return value
        tensor = torch.tensor(
            [value], dtype=torch.float64, device=self.device() if torch.cuda.is_available() else "cpu"
        )
        dist.all_reduce(tensor)
        return tensor.item()
