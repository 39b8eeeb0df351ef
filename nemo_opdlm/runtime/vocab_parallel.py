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


CHUNK_ROWS = 256
"""Positions per chunk of the fp32 temporaries below: ``[CHUNK_ROWS, V/tp]`` fp32 at a time (at
Qwen3's 151,936 ids, 156 MB at TP=1) instead of the whole ``[N, V/tp]`` (2.4 GB for one 4,000-token
row); a 4,000-token micro-batch takes 16 chunks, each one large GEMM-free pass over the vocabulary."""


def log_normaliser(logits: Tensor, group: Group, chunk: int = CHUNK_ROWS) -> Tensor:
    """``log sum_v exp(logits[..., v])`` over the full (sharded) vocabulary, fp32, shape ``[...]``;
    no gradient. Computed ``chunk`` positions at a time, so that only one chunk's fp32 copy of the
    logits is alive (the log-softmax of the whole tensor would be ``[..., V/tp]`` fp32)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])  # [N, V/tp]
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for lo in range(0, flat.shape[0], chunk):
        part = flat[lo:lo + chunk].to(torch.float32, copy=True)  # [c, V/tp]
        peak = all_reduce_max(part.amax(dim=-1, keepdim=True), group)  # [c, 1]
        total = part.sub_(peak).exp_().sum(dim=-1)  # [c]
        if group is not None:
            dist.all_reduce(total, group=group)
        out[lo:lo + chunk] = total.log_() + peak[:, 0]
        del part  # before the next chunk's copy: one chunk alive at a time
    return out.view(logits.shape[:-1])


def topk_log_probs(logits: Tensor, k: int, group: Group, chunk: int = CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """The global top-k ``(log-probs fp32, global ids)`` of the softmax of sharded ``logits [..., V/tp]``:
    the top-k of the raw logits (the same ids as the log-softmax's: it shifts each row by one
    constant) minus the log-normaliser, so no ``[..., V/tp]`` fp32 log-softmax is ever held."""
    values, ids = topk(logits.detach(), k, group)  # [..., k]
    return values.float() - log_normaliser(logits, group, chunk)[..., None], ids


def log_probs(logits: Tensor, group: Group, chunk: int = CHUNK_ROWS) -> Tensor:
    """The log-softmax of sharded ``logits [..., V/tp]`` over the full vocabulary, this rank's shard in
    fp32, without gradient: the output and one chunk's fp32 copy are the only ``[., V/tp]`` tensors
    alive (``log_softmax`` holds three: the upcast, the shifted copy and its exponential)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])  # [N, V/tp]
    lse = log_normaliser(flat, group, chunk)  # [N]
    out = torch.empty(flat.shape, dtype=torch.float32, device=logits.device)
    for lo in range(0, flat.shape[0], chunk):
        out[lo:lo + chunk] = flat[lo:lo + chunk].to(torch.float32, copy=True).sub_(lse[lo:lo + chunk, None])
    return out.view(logits.shape)


def full_kl(student: Tensor, teacher_logprobs: Tensor, group: Group, chunk: int = CHUNK_ROWS) -> Tensor:
    """Forward KL per token ``[N]`` (fp32, replicated over the TP group) of full-vocabulary teacher
    log-probs (``[N, V/tp]``, the student's sharding) against the student's softmax (``student
    [N, V/tp]`` logits, any dtype): ``sum_v p_v (log p_v - log q_v)``. Differentiable in ``student``.

    The log-normaliser forward, then the terms a chunk of positions at a time; backward builds
    ``d/ds_v = g * (q_v * sum p - p_v)`` a chunk at a time. Neither pass holds the ``[N, V/tp]``
    fp32 log-softmax or its temporaries whole (the exact composition keeps about seven)."""
    if teacher_logprobs.shape != student.shape:
        raise ValueError(f"full-vocab teacher log-probs {tuple(teacher_logprobs.shape)} do not match the "
                         f"student's logits shard {tuple(student.shape)} (same tokenizer and TP?)")
    return _FullKL.apply(student, teacher_logprobs, group, chunk)


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, logp_t: Tensor, group: Group, chunk: int) -> Tensor:
        lse = log_normaliser(student, group, chunk)  # [N]
        terms = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        mass = torch.empty_like(terms)
        for lo in range(0, student.shape[0], chunk):
            hi = lo + chunk
            t = logp_t[lo:hi].float()
            p = t.exp()  # [c, V/tp]
            log_q = student[lo:hi].to(torch.float32, copy=True).sub_(lse[lo:hi, None])
            terms[lo:hi] = torch.where(p > 0, p * (t - log_q), torch.zeros_like(p)).sum(dim=-1)
            mass[lo:hi] = p.sum(dim=-1)
            del t, p, log_q  # one chunk alive at a time
        if group is not None:
            dist.all_reduce(terms, group=group)
            dist.all_reduce(mass, group=group)
        ctx.save_for_backward(student, logp_t, lse, mass)
        ctx.chunk = chunk
        return terms

    @staticmethod
    def backward(ctx, grad: Tensor):
        student, logp_t, lse, mass = ctx.saved_tensors
        out = torch.empty_like(student)
        for lo in range(0, student.shape[0], ctx.chunk):
            hi = lo + ctx.chunk
            q = student[lo:hi].to(torch.float32, copy=True).sub_(lse[lo:hi, None]).exp_()  # [c, V/tp]
            q.mul_(mass[lo:hi, None]).sub_(logp_t[lo:hi].float().exp())
            out[lo:hi] = q.mul_(grad[lo:hi, None].float())
            del q
        return out, None, None, None


def topk_kl(student: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor, group: Group,
            chunk: int = CHUNK_ROWS) -> Tensor:
    """Forward KL per token ``[N]`` (fp32, replicated over the TP group) of top-k teacher targets
    (``teacher_logprobs``, ``teacher_ids``: ``[N, k]``, not renormalised) against the student's
    softmax over the full sharded vocabulary (``student [N, V/tp]`` logits, any dtype):
    ``sum_k p_k (log p_k - log q(id_k))``. Differentiable in ``student``.

    Only the log-normaliser (``[N]``) and the k gathered logits are needed forward; backward builds
    ``d/ds_v = g * (q_v * sum_k p_k - sum_{k: id_k = v} p_k)`` a chunk at a time. Neither pass holds
    the ``[N, V/tp]`` fp32 log-softmax (nor its gradient) whole."""
    return _TopKKL.apply(student, teacher_logprobs.float(), teacher_ids.long(), group, chunk)


class _TopKKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, logp_t: Tensor, ids: Tensor, group: Group, chunk: int) -> Tensor:
        lse = log_normaliser(student, group, chunk)  # [N]
        local = student.shape[-1]
        local_ids = ids - shard_offset(local, group)  # [N, k]
        owned = (local_ids >= 0) & (local_ids < local)
        picked = student.gather(-1, local_ids.clamp(0, local - 1)).float() * owned  # [N, k]
        if group is not None:
            dist.all_reduce(picked, group=group)
        p_t = logp_t.exp()  # [N, k]
        terms = torch.where(p_t > 0, p_t * (logp_t - (picked - lse[:, None])), torch.zeros_like(p_t))
        ctx.save_for_backward(student, lse, local_ids, owned, p_t)
        ctx.chunk = chunk
        return terms.sum(dim=-1)  # [N]

    @staticmethod
    def backward(ctx, grad: Tensor):
        student, lse, local_ids, owned, p_t = ctx.saved_tensors
        out = torch.empty_like(student)
        mass = p_t.sum(dim=-1, keepdim=True)  # [N, 1]
        p_owned = p_t * owned  # [N, k] the teacher's mass on this shard's ids
        index = local_ids.clamp(0, student.shape[-1] - 1)
        for lo in range(0, student.shape[0], ctx.chunk):
            hi = lo + ctx.chunk
            part = student[lo:hi].to(torch.float32, copy=True).sub_(lse[lo:hi, None]).exp_()  # [c, V/tp] q
            part.mul_(mass[lo:hi]).scatter_add_(-1, index[lo:hi], -p_owned[lo:hi])
            out[lo:hi] = part.mul_(grad[lo:hi, None].float())
            del part  # one chunk alive at a time
        return out, None, None, None, None
