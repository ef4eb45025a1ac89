"""Data parallelism for train.py: torchrun sets RANK / WORLD_SIZE; without them everything is a no-op.

Each optimizer step sees one *global* micro-batch, drawn identically on every rank from the same
seeded order; rank r trains on its contiguous slice. The loss is a sum over label tokens divided by
the global token count, so N processes produce the same gradient as one process on the whole batch.
"""
import os

import torch
import torch.distributed as dist
from torch import nn


def setup(device: str) -> tuple[int, int, str]:
    """(rank, world size, device); gloo on CPU, nccl on CUDA (one GPU per local rank)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(items: list, rank: int, world: int) -> list:
    if len(items) % world:
        raise ValueError(f"global batch of {len(items)} does not split over {world} processes: "
                         f"make --batch-size a multiple of {world}")
    n = len(items) // world
    return items[rank * n:(rank + 1) * n]


def global_sum(x: int | float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor(float(x), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


class SummedLoss(nn.Module):
    """model.loss as a forward(), which is what DDP hooks its gradient all-reduce into."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model.loss(**batch, reduction="sum")


def wrap(model, world: int, device: str) -> nn.Module:
    loss = SummedLoss(model)
    if world == 1:
        return loss
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(loss, device_ids=[device] if device.startswith("cuda") else None)
