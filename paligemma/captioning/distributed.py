"""Data parallelism for train.py: torchrun sets RANK / WORLD_SIZE; without them everything is a no-op.

Each optimizer step sees one *global* micro-batch, drawn identically on every rank from the same
seeded order; rank r trains on its contiguous slice. The loss is a sum over label tokens divided by
the global token count, so N processes produce the same gradient as one process on the whole batch.
"""
import contextlib
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


# --- FSDP2: full fine-tuning of models that do not fit one device -----------------------------------
# Each SigLIP and Gemma layer is one unit (gathered for its forward, resharded after); the root unit
# holds the rest (embedding table = output head, projector, final norms). DDP's arithmetic is kept:
# gradients are averaged over ranks, so the same loss normalisation gives the same steps.

def fully_sharded(model, world: int, device: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.split(":")[0], (world,))
    for layer in [*model.vision_tower.vision_model.encoder.layers, *model.language_model.model.layers]:
        fully_shard(layer, mesh=mesh)
    return fully_shard(SummedLoss(model), mesh=mesh)


@contextlib.contextmanager
def root_gathered(wrapped: nn.Module):
    """Generation and validation call the model's own methods, not the root's forward, so the root's
    parameters are gathered by hand around them (layers gather themselves). Every rank must enter."""
    if not hasattr(wrapped, "unshard") or not dist.is_initialized():
        yield
        return
    # FSDP2 sets itself up at the root's first forward; a generation before any training step would
    # reach the layers first, so set it up here (a private call: torch offers no public one)
    wrapped._get_fsdp_state()._lazy_init()
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


def full_state(wrapped: nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """Whole (unsharded) model and optimizer state on rank 0's CPU; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = {k.removeprefix("model."): v for k, v in get_model_state_dict(wrapped, options=options).items()}
    return model, (get_optimizer_state_dict(wrapped, optimizer, options=options) if optimizer else None)


def load_full_state(wrapped: nn.Module, optimizer, model_state: dict, optimizer_state: dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(wrapped, {"model." + k: v for k, v in model_state.items()}, options=options)
    set_optimizer_state_dict(wrapped, optimizer, optimizer_state, options=options)


class Parallel:
    """How train.py's loop runs over processes, as one object so the loop has no sharding branch: one
    process, DDP (every rank holds the model; gradients all-reduced in backward) or FSDP2 (`fsdp=True`:
    parameters, gradients and optimizer state sharded; full fine-tuning of models one device cannot
    hold). `wrapped` is the module the loop calls for the loss."""

    def __init__(self, model, rank: int, world: int, device: str, fsdp: bool = False):
        self.model, self.rank, self.world, self.sharded = model, rank, world, fsdp
        self.wrapped = fully_sharded(model, world, device) if fsdp else wrap(model, world, device)

    @property
    def generates(self) -> bool:
        """Whether this rank captions (validation, test): rank 0, or every rank of a sharded model, whose
        layers gather their parameters only with all ranks taking part."""
        return self.rank == 0 or self.sharded

    def no_sync(self, last_micro_batch: bool):
        """Around a micro-batch's forward and backward: DDP all-reduces only on the step's last one."""
        if last_micro_batch or self.world == 1 or self.sharded:
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def gathered(self):
        """Around generation (the model's own methods, not the wrapper's forward); every rank enters."""
        return root_gathered(self.wrapped)

    def full_state(self, optimizer=None) -> tuple[dict | None, dict | None]:
        """(model, optimizer) state gathered from the shards to rank 0's CPU, every rank calling; (None,
        None) when nothing is sharded (each rank already holds it all)."""
        return full_state(self.wrapped, optimizer) if self.sharded else (None, None)
