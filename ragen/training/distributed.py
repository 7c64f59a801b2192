"""Data parallelism over ``torch.distributed``, launched by ``torchrun`` or ``accelerate launch``.

The launch itself (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is read by
:func:`ragen.parallel.detect_launch`, the one parser shared with ``ragen index``; here we join the process
group it describes (NCCL on CUDA, gloo on CPU). A single process needs none of this.
"""

from __future__ import annotations

import logging

import torch

from ..parallel import Launch, detect_launch

logger = logging.getLogger(__name__)

DistContext = Launch  # the training loop's name for it: rank, world_size, local_rank, is_main, active


def init_distributed(device: str) -> Launch:
    """Join the process group the launcher prepared; a plain ``python`` run gets a single-process context."""
    launch = detect_launch()
    if not launch.active:
        return launch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(backend=backend)
        logger.info("joined process group: rank %d of %d (%s)", launch.rank, launch.world_size, backend)
    return Launch(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=launch.local_rank)


def barrier(ctx: Launch) -> None:
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(ctx: Launch, values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (in place and returned); identity for one process."""
    if ctx.active:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
