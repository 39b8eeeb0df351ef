"""Softmax, top-k and gathers over a vocabulary split across the tensor-parallel group.

One job: the vocabulary-parallel math shared by the teacher targets, the KL loss and the rollout
sampler, done without ever gathering the full vocabulary on one rank. Reductions that need
gradients go through megatron-core's autograd-aware mappings (forward all-reduce, backward
identity: the loss is replicated across the TP group).

Shapes: ``logits`` is this rank's shard ``[..., V/tp]`` of a ``[..., V]`` tensor; shard r holds
global ids ``[r * V/tp, (r + 1) * V/tp)``. Every function takes the tensor-parallel ``group`` it
reduces over (``ParallelContext.tp_group``): None means an unsplit vocabulary (TP = 1), and the
function is then local math with no collective.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from torch import Tensor

Group = Optional[dist.ProcessGroup]


def shard_offset(local_vocab: int, group: Group) -> int:
    """Global id of this rank's first vocabulary entry."""
    return 0 if group is None else dist.get_rank(group) * local_vocab


def all_reduce_max(x: Tensor, group: Group) -> Tensor:
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def reduce_sum(x: Tensor, group: Group) -> Tensor:
    """Sum over the TP group; gradient flows back unchanged to every rank's local term."""
    if group is None:
        return x
    return reduce_from_tensor_model_parallel_region(x, group)


def log_softmax(logits: Tensor, group: Group) -> Tensor:
    """Log-softmax over the full (sharded) vocabulary; returns this rank's shard, in fp32.

    Differentiable: a loss built from the shard must be summed over the TP group (``reduce_sum``,
    ``gather_global``); the normaliser's gradient is then all-reduced, since every rank's terms
    depend on it.
    """
    logits = logits.float()
    max_logit = all_reduce_max(logits.detach().amax(dim=-1, keepdim=True), group)  # [..., 1]
    shifted = logits - max_logit
    log_z = reduce_sum(shifted.exp().sum(dim=-1, keepdim=True), group).log()  # [..., 1]
    if group is not None:  # forward identity, backward all-reduce
        log_z = copy_to_tensor_model_parallel_region(log_z, group)
    return shifted - log_z


def all_gather_last(x: Tensor, group: Group) -> Tensor:
    """Concatenate each rank's ``[..., n]`` along the last dim (no gradient)."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def topk(values: Tensor, k: int, group: Group) -> tuple[Tensor, Tensor]:
    """Global top-k ``(values, global ids)`` of a sharded ``[..., V/tp]`` tensor, sorted descending.

    Each rank contributes its local top-k; the winners are chosen among tp * k candidates.
    """
    local = values.shape[-1]
    k_local = min(k, local)
    v, i = values.topk(k_local, dim=-1)  # [..., k_local]
    i = i + shard_offset(local, group)
    v, i = all_gather_last(v, group), all_gather_last(i, group)  # [..., tp * k_local]
    if v.shape[-1] < k:
        raise ValueError(f"top-k of {k} asked from a vocabulary of {v.shape[-1]}")
    best_v, pos = v.topk(k, dim=-1)
    return best_v, i.gather(-1, pos)


def gather_global(values: Tensor, ids: Tensor, group: Group) -> Tensor:
    """``values[..., ids]`` for global vocabulary ids ``[..., k]``; differentiable.

    Each rank fills the ids it owns and the TP group sums the partial results.
    """
    local = values.shape[-1]
    local_ids = ids - shard_offset(local, group)
    owned = (local_ids >= 0) & (local_ids < local)
    picked = values.gather(-1, local_ids.clamp(0, local - 1)) * owned  # [..., k]
    return reduce_sum(picked, group)


def argmax(values: Tensor, group: Group) -> tuple[Tensor, Tensor]:
    """Global ``(max value, global id)`` over the last dim; ties go to the lowest id."""
    v, i = topk(values, 1, group)
    return v[..., 0], i[..., 0]
