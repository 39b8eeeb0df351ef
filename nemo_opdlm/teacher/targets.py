"""Teacher targets: the AR teacher's next-token log-probs at every response position.

One job: run the frozen teacher causally over ``[prompt | x0]`` and return, for response position
i, the distribution p(x_i | x_<i): the teacher's logits at column ``P + i - 1`` (shifted right by
one: the first response token gets the prediction made at the last prompt token). Either the full
vocabulary (this rank's shard) or the top-k (default 16) log-probs and their global ids,
computed vocabulary-parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from nemo_opdlm.models import masks
from nemo_opdlm.models.masks import logits_needed, next_token_logits
from nemo_opdlm.models.student import parallel_of
from nemo_opdlm.runtime import vocab_parallel
from nemo_opdlm.runtime.pipeline import Batch, forward_collect


@dataclass
class TeacherTargets:
    """Teacher log-probs aligned to response positions.

    Attributes:
        logprobs: full-vocab: ``[B, L, V/tp]`` (this rank's shard); top-k: ``[B, L, k]`` values.
        ids: top-k only: ``[B, L, k]`` global vocabulary ids; None for full-vocab targets.
    """

    logprobs: torch.Tensor
    ids: Optional[torch.Tensor] = None


def teacher_batch(prompt_ids: torch.Tensor, prompt_lens: torch.Tensor, x0: torch.Tensor,
                  x0_valid: torch.Tensor) -> Batch:
    """Causal teacher input ``[left-padded prompt | x0]`` (block size 1, no xt).

    A row with an empty prompt has no prediction of its first x0 token (its target is read off a
    padding column): the training step refuses such prompts (``step.on_grid``), and on the absolute
    grid an empty prefix only happens in front of a given head token, which no loss reads."""
    layout = masks.build_layout(prompt_lens, prompt_ids.shape[1], x0_valid, block_size=1, with_xt=False)
    return dict(
        input_ids=torch.cat([prompt_ids, x0], dim=1),
        position_ids=layout.position_ids,
        meta=layout.meta,
    )


def shifted_targets(logits: torch.Tensor, prompt_width: int, response_len: int,
                    top_k: Optional[int], tp_group: vocab_parallel.Group) -> TeacherTargets:
    """Targets from teacher logits ``[B, P + L, V/tp]``: take columns ``P-1 .. P+L-2``.

    The logits may also be those of the last ``logits_needed(L)`` columns only
    (``forward(..., logits_last=...)``): the same columns, counted from the end. ``tp_group``: the
    group the teacher's vocabulary is split over (None: not split).
    """
    if logits.shape[1] not in (prompt_width + response_len, logits_needed(response_len)):
        raise ValueError(f"teacher logits {tuple(logits.shape)} are neither the {prompt_width} + {response_len} "
                         f"columns of [prompt | x0] nor their last {logits_needed(response_len)}")
    window = next_token_logits(logits, response_len)  # [B, L, V/tp]
    # the log-normaliser in fp32 a chunk of positions at a time: full-vocabulary targets hold their
    # [B, L, V/tp] fp32 log-probs and one chunk (not the log-softmax's temporaries); top-k targets
    # are the top-k of the raw logits minus it, and no [B, L, V/tp] fp32 tensor is ever built
    if top_k is None:
        return TeacherTargets(vocab_parallel.log_probs(window, tp_group))  # [B, L, V/tp] fp32
    values, ids = vocab_parallel.topk_log_probs(window, top_k, tp_group)  # [B, L, k]
    return TeacherTargets(values, ids)


@torch.no_grad()
def compute_targets(teacher: Sequence[torch.nn.Module], batches: Sequence[Batch], prompt_width: int,
                    response_len: int, top_k: Optional[int] = 16) -> list[TeacherTargets]:
    """Teacher targets per micro-batch (on the last pipeline stage; empty list elsewhere)."""
    group = parallel_of(teacher).tp_group
    return forward_collect(
        teacher, batches, lambda logits, _: shifted_targets(logits, prompt_width, response_len, top_k, group),
        logits_last=logits_needed(response_len),
    )
