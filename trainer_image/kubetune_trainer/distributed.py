"""The process group, from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

One launcher path: a single process without torchrun is simply world size 1, no process group.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "DistEnv":
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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

    def sum(self, value: float) -> float:
        """Sum a number over all ranks (identity when alone)."""
        if not dist.is_initialized():
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device() if torch.cuda.is_available() else "cpu")
        dist.all_reduce(tensor)
        return tensor.item()
