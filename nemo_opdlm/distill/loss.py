"""Distillation losses on the student's xt positions: forward KL to the teacher, or cross-entropy.

One job: per-token loss at the loss-mask positions of a micro-batch, vocabulary-parallel, and its
reduction. Non-goals: choosing the positions (``states.py``), teacher forwards
(``targets.py``), the megatron-core schedule (``training/``).

The student predicts the token at its own position (no shift): the logits for response position i
are column ``S - L + i`` of the row ``[prompt | x0 | xt]`` (xt is the last L columns).

Per token:

- ``kl``: ``sum_v p_T(v) (log p_T(v) - log p_S(v))`` over the full (sharded) vocabulary, or over the
  teacher's top-k ids with the student's log-softmax taken over the FULL vocabulary and the teacher's
  top-k log-probs not renormalised (the reference's choice). The top-k form needs only the student's
  log-normaliser and its k gathered logits (``vocab_parallel.topk_kl``: never the ``[N, V/tp]`` fp32
  log-softmax); the full form keeps the exact log-softmax.
- ``ce``: ``-log p_S(x0_i)`` (masked-diffusion cross-entropy: SFT / random-mask conversion baseline).

Reduction (the one mean every caller gets): mean over the loss tokens of each sequence, then the sum
over this micro-batch's sequences divided by ``num_sequences``, the number of sequences with at least
one loss token in the GLOBAL batch (all micro-batches, all data-parallel ranks; see
:func:`count_sequences`). Summing the returned losses over micro-batches and DP ranks therefore gives
the global mean, whatever the micro-batch count or DP size.

Under megatron-core's schedule: a ``loss_func`` returning ``(loss, reported)`` has its loss divided by
the number of micro-batches, and DDP averages gradients over DP; return
``loss * num_microbatches * dp_size`` there (or use ``calculate_per_token_loss``) to keep this mean.
Padded vocabulary entries (logits = dtype min) get probability 0 and contribute exactly 0.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel
from torch import Tensor

from nemo_opdlm.runtime import vocab_parallel
from nemo_opdlm.runtime.comm import collective_device
from nemo_opdlm.runtime.vocab_parallel import Group

Metrics = dict[str, Tensor]


def xt_logits(logits: Tensor, response_len: int) -> Tensor:
    """The student's logits at xt positions: the last ``response_len`` columns ``[B, L, V/tp]``.

    ``logits`` cover ``[prompt | x0 | xt]``, or only their last columns (``logits_last``).
    """
    if logits.dim() != 3 or logits.shape[1] < response_len:
        raise ValueError(f"student logits {tuple(logits.shape)} cannot hold an xt of length {response_len}")
    return logits[:, -response_len:]


def token_kl(student: Tensor, teacher_logprobs: Tensor, teacher_ids: Optional[Tensor] = None, *,
             tp_group: Group) -> Tensor:
    """Forward KL(teacher || student) per token ``[N]`` (fp32), replicated over the TP group.

    Args:
        student: ``[N, V/tp]`` the student's logits shard at the selected positions.
        teacher_logprobs: full-vocab ``[N, V/tp]`` shard (same sharding as ``student``), or top-k
            ``[N, k]`` values (replicated).
        teacher_ids: ``[N, k]`` global vocabulary ids of the top-k values; None for full-vocab.
        tp_group: the group the student's vocabulary is split over (None: not split).
    """
    # neither form holds the [N, V/tp] fp32 log-softmax whole, forward or backward (a chunk of
    # positions at a time: runtime/vocab_parallel.py, benchmarks/results/targets_memory.json)
    if teacher_ids is None:
        return vocab_parallel.full_kl(student, teacher_logprobs, tp_group)  # [N]
    logp_t = teacher_logprobs.float()
    if teacher_ids.shape != logp_t.shape:
        raise ValueError(f"top-k ids {tuple(teacher_ids.shape)} != top-k log-probs {tuple(logp_t.shape)}")
    return vocab_parallel.topk_kl(student, logp_t, teacher_ids, tp_group)  # [N]


def token_cross_entropy(student: Tensor, targets: Tensor) -> Tensor:
    """``-log p_S(target)`` per token ``[N]`` (fp32) from ``[N, V/tp]`` logits and ``[N]`` global ids."""
    logits = student.float()
    if logits is student:  # megatron's kernel subtracts the max in place: never on the caller's tensor
        logits = logits.clone()
    return tensor_parallel.vocab_parallel_cross_entropy(logits, targets.long())


def reduce_per_sequence(token_values: Tensor, loss_mask: Tensor,
                        num_sequences: Union[int, Tensor], name: str) -> tuple[Tensor, Metrics]:
    """Mean of ``token_values`` ``[N]`` (the loss_mask positions, row-major) per sequence, summed over
    sequences, divided by the global ``num_sequences``. Returns ``(loss, metrics)``."""
    counts = loss_mask.sum(-1)  # [B]
    rows = loss_mask.nonzero()[:, 0]  # [N]
    if rows.numel() != token_values.numel():
        raise ValueError(f"{token_values.numel()} token values for {rows.numel()} loss positions")
    seq_sum = token_values.new_zeros(loss_mask.shape[0]).index_add(0, rows, token_values)  # [B]
    seq_mean = seq_sum / counts.clamp(min=1).to(seq_sum.dtype)  # [B], 0 for rows without tokens
    denom = torch.as_tensor(num_sequences, dtype=seq_mean.dtype, device=seq_mean.device).clamp(min=1)
    loss = seq_mean.sum() / denom
    metrics = {
        f"{name}_sum": token_values.detach().sum(),
        "seq_mean_sum": seq_mean.detach().sum(),
        "num_tokens": counts.sum().to(torch.float32),
        "num_sequences": (counts > 0).sum().to(torch.float32),
    }
    return loss, metrics


def kl_loss(student_logits: Tensor, loss_mask: Tensor, teacher_logprobs: Tensor,
            teacher_ids: Optional[Tensor] = None, *,
            num_sequences: Union[int, Tensor], tp_group: Group) -> tuple[Tensor, Metrics]:
    """Forward KL(teacher || student) at the loss positions, reduced as the module docstring says.

    Args:
        student_logits: ``[B, P+2L, V/tp]`` the student's logits shard for ``[prompt | x0 | xt]``.
        loss_mask: ``[B, L]`` bool, positions that count (from ``states.py``).
        teacher_logprobs: ``[B, L, V/tp]`` full-vocab shard, or ``[B, L, k]`` top-k values.
        teacher_ids: ``[B, L, k]`` global ids for top-k targets; None for full-vocab.
        num_sequences: sequences with >= 1 loss token in the global batch.
        tp_group: the group the vocabulary is split over (None: not split).

    Returns ``(loss, metrics)``: metrics ``kl_sum`` (summed token KL), ``seq_mean_sum`` (the loss
    numerator), ``num_tokens``, ``num_sequences`` (this micro-batch's), all detached.
    """
    loss_mask = loss_mask.bool()
    student = xt_logits(student_logits, loss_mask.shape[1])[loss_mask]  # [N, V/tp]
    if teacher_logprobs.shape[:2] != loss_mask.shape:
        raise ValueError(f"teacher targets {tuple(teacher_logprobs.shape)} do not cover the response "
                         f"{tuple(loss_mask.shape)}")
    ids = None if teacher_ids is None else teacher_ids[loss_mask]  # [N, k]
    per_token = token_kl(student, teacher_logprobs[loss_mask], ids, tp_group=tp_group)  # [N]
    return reduce_per_sequence(per_token, loss_mask, num_sequences, "kl")


def cross_entropy_loss(student_logits: Tensor, loss_mask: Tensor, targets: Tensor, *,
                       num_sequences: Union[int, Tensor]) -> tuple[Tensor, Metrics]:
    """Masked-diffusion cross-entropy ``-log p_S(x0_i)`` at the loss positions, same reduction.

    ``targets`` is ``[B, L]`` (the batch's ``x0``); metrics as :func:`kl_loss` with ``ce_sum``.
    """
    loss_mask = loss_mask.bool()
    student = xt_logits(student_logits, loss_mask.shape[1])[loss_mask]  # [N, V/tp]
    per_token = token_cross_entropy(student, targets[loss_mask])  # [N]
    return reduce_per_sequence(per_token, loss_mask, num_sequences, "ce")


def causal_cross_entropy_loss(logits: Tensor, loss_mask: Tensor, targets: Tensor, *,
                              num_sequences: Union[int, Tensor]) -> tuple[Tensor, Metrics]:
    """Next-token cross-entropy on the response of causal ``[prompt | response]`` rows (the ``ar``
    method), same reduction: response token i is predicted at column ``P + i - 1``, the teacher's
    window (``models.masks.next_token_logits``).

    ``logits`` cover ``[prompt | response]`` or their last ``logits_needed(L)`` columns;
    ``loss_mask`` and ``targets`` are ``[B, L]``. Metrics as :func:`kl_loss` with ``ce_sum``.
    """
    from nemo_opdlm.models.masks import next_token_logits

    loss_mask = loss_mask.bool()
    per_token = token_cross_entropy(next_token_logits(logits, loss_mask.shape[1])[loss_mask],
                                    targets[loss_mask])  # [N]
    return reduce_per_sequence(per_token, loss_mask, num_sequences, "ce")


def count_sequences(loss_masks: Iterable[Tensor], group: Optional[dist.ProcessGroup] = None) -> int:
    """Sequences with >= 1 loss token over these micro-batches, summed over ``group`` (the DP group).

    Every rank of ``group`` must call it (it all-reduces). TP ranks hold the same data, so pass the
    data-parallel group, not the world.
    """
    masks = list(loss_masks)
    local = sum(int(m.bool().any(-1).sum()) for m in masks)
    if group is None or dist.get_world_size(group) == 1:
        return local
    total = torch.tensor([local], dtype=torch.long, device=collective_device(group))
    dist.all_reduce(total, group=group)
    return int(total.item())
