"""The processes of a training run: device resolution, the torchrun process group, DDP gradient compression.

A single process or one per GPU under `torchrun` (NCCL on GPU, gloo on CPU), joined
with a timeout long enough for rank 0's checkpoint writes at an epoch's end.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from visrec.stages.train.resources import disable_nccl_shared_memory_if_short, resolve_device, shared_memory_free


@dataclass
class Processes:
    """This process's place in the run: rank, world size, its device, and whether it created the group."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def local_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def setup_processes(device: str | None, timeout_minutes: int = 60) -> Processes:
    """Resolve the device (failing fast when a requested GPU is not usable) and join the torchrun
    process group if the environment describes one (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            disable_nccl_shared_memory_if_short(local_processes(), shared_memory_free())
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    return Processes(rank, world, dev, owns)


def bf16_allreduce_hook(process_group, bucket):  # no annotations: DDP checks them, and they are strings here
    """DDP communication hook: all-reduce each gradient bucket in bf16, half the bytes of fp32.

    What torch's `default_hooks.bf16_compress_hook` does, for every backend: torch's
    refuses gloo, and the CPU tests and quality measurement must run this very code.
    """
    group = process_group or dist.group.WORLD
    compressed = bucket.buffer().to(torch.bfloat16).div_(group.size())
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(fut: Any) -> torch.Tensor:
        buffer = bucket.buffer()
        buffer.copy_(fut.value()[0])
        return buffer

    return future.then(decompress)


def broadcast(obj: Any, procs: Processes) -> Any:
    if not procs.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
