"""Data-parallel training under torchrun, with PyTorch's own engine (DistributedDataParallel).

`nmt train` started by torchrun (WORLD_SIZE > 1 in the environment) joins the process group
(gloo on CPU, nccl on CUDA). Every rank builds the same epoch batches from the seed and trains on
its own disjoint share; DDP averages the gradients. Rank 0 alone validates, logs and writes
checkpoints, and every decision is agreed on here so all ranks act alike: the validation BLEU is
rank 0's (`broadcast_float`), and after every update one all-reduce (`agree`) sums the token
counts and the stop requests and time-budget flags, which may differ between ranks. Whether an
update is applied needs no agreement: it depends on the gradient norm, computed from gradients
that DDP has already made identical on every rank. Started without torchrun, everything here is
a no-op and training runs as one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> World:
    """Join the process group if torchrun started us; pick the backend from the device."""
    if not launched_by_torchrun():
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def rank_device(world: World, device: torch.device) -> torch.device:
    """The device of this rank: under torchrun on GPUs, GPU number LOCAL_RANK."""
    if device.type == "cuda" and world.active:
        return torch.device("cuda", world.local_rank)
    return device


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """What the training forward runs: the model itself, or under torchrun its DDP wrapper, whose
    backward pass averages the gradients over the ranks."""
    if not world.active:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def leave(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_float(world: World, value: float, device: torch.device) -> float:
    """Rank 0's value on every rank."""
    if not world.active:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def agree(world: World, values: list[int], device: torch.device) -> list[int]:
    """Element-wise sums over all ranks, in one all-reduce (token counts, stop and budget flags)."""
    if not world.active:
        return values
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_objects(world: World, obj) -> list:
    """Every rank's object, on every rank (used for per-rank RNG states in checkpoints)."""
    if not world.active:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered
