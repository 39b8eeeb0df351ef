"""Small collectives every layer needs: who is rank 0, wait for all, agree on a flag, share a value.

One job: the handful of world-level helpers that checkpoints, converters, metrics and losses share,
each a no-op (or the identity) in a single process without ``torch.distributed``. Non-goals:
megatron-core's model-parallel groups (``distributed.py`` builds them; callers pass the group a
collective runs over).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def distributed() -> bool:
    """``torch.distributed`` is initialised (a torchrun / srun job, or a test's runtime)."""
    return dist.is_available() and dist.is_initialized()


def is_rank0() -> bool:
    return not distributed() or dist.get_rank() == 0


def barrier() -> None:
    if distributed():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (any picklable object)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a tensor must be for a collective over ``group``: the current GPU under NCCL, else the CPU.

    NCCL only takes CUDA tensors; gloo takes CPU tensors everywhere (CUDA ones only for some ops).
    """
    if distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(flag: bool) -> bool:
    """True on every rank if it is True on any rank (e.g. a pre-emption signal seen by one)."""
    if not distributed():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
