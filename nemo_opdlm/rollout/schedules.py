"""Unmasking rules for one denoising round, and the rollout-length curriculum.

One job: decide *which* masked positions of a block are unmasked in a round (static: the k most
confident; dynamic: every position whose confidence is strictly above a threshold, and at least the
static count), the schedule a trajectory is decoded under (:class:`BlockSchedule`, made once from the
model's and the decoding's settings and carried by the rollout to the states and the export), and
how long rollouts are at a training step. Non-goals: computing confidences (``sampling.py``) and
running the model (``sampler.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.rollout.decode import DecodeConfig

@dataclass(frozen=True)
class BlockSchedule:
    """How a trajectory's blocks are decoded: the facts every reader of it needs, in one place.

    Made once (:meth:`of`) from the model's diffusion settings and the decoding settings; the
    sampler decodes under it, the rollout carries it, and the training states (which blocks, which
    rounds), the row records, the length curriculum and the exported ``generation_config.json`` read
    it, so no reader rebuilds it from the config and can disagree with the sampler.
    """

    block_size: int
    """Tokens per block (1: causal decoding)."""
    block_grid: str
    """Where blocks fall (``models/grid.py``)."""
    rounds_per_block: int
    """Rounds of the static schedule (and the minimum per round under a threshold)."""
    threshold: Optional[float]
    """The dynamic rule's threshold (every masked position strictly above it, and at least the
    static count), or None: the static rule."""

    @classmethod
    def of(cls, diffusion: Optional[DiffusionConfig], decode: DecodeConfig) -> "BlockSchedule":
        """The schedule of ``decode`` on a model described by ``diffusion`` (None, or ``decode.mode``
        'ar': causal decoding, one token per block and round). Checks ``steps_per_block`` against
        the block size."""
        if decode.mode == "ar" or diffusion is None:
            return cls(block_size=1, block_grid="response", rounds_per_block=1, threshold=None)
        return cls(block_size=diffusion.block_size, block_grid=diffusion.block_grid,
                   rounds_per_block=decode.rounds_per_block(diffusion.block_size),
                   threshold=decode.threshold if decode.mode == "dynamic" else None)

    @property
    def counts(self) -> list[int]:
        """Tokens the static rule unmasks in each round (``static_counts``)."""
        return static_counts(self.block_size, self.rounds_per_block)


def static_counts(block_size: int, steps_per_block: int) -> list[int]:
    """Tokens to unmask in each round of a block; they sum to ``block_size``.

    ``block_size / steps_per_block`` per round; a remainder goes to the first rounds (4 tokens in
    3 rounds: [2, 1, 1]).
    """
    if not 1 <= steps_per_block <= block_size:
        raise ConfigError(
            f"steps_per_block must be in [1, block_size={block_size}], got {steps_per_block}"
        )
    base, extra = divmod(block_size, steps_per_block)
    return [base + (1 if r < extra else 0) for r in range(steps_per_block)]


def select_unmask(
    confidence: torch.Tensor,
    masked: torch.Tensor,
    count: int | torch.Tensor,
    threshold: Optional[float | torch.Tensor] = None,
) -> torch.Tensor:
    """Positions to unmask this round, ``[N, K]`` bool (a subset of ``masked``).

    Args:
        confidence: ``[N, K]`` confidence of each position's candidate token (finite).
        masked: ``[N, K]`` bool, positions still masked.
        count: the static number for this round: the ``count`` most confident masked positions
            are unmasked (all of them if fewer remain; ties go to the leftmost position). An int,
            or one per row (``[N]``: rows in different rounds of their blocks).
        threshold: dynamic rule: also unmask every masked position with ``confidence > threshold``
            (strict, as the reference); a float, or one per row (``[N, 1]``; ``inf`` = the static
            rule for that row). None: static rule only.
    """
    neg = torch.finfo(confidence.dtype).min
    conf = confidence.masked_fill(~masked, neg)  # [N, K]
    order = conf.argsort(dim=-1, descending=True, stable=True)  # [N, K]
    positions = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)  # [N, K] rank of each position
    limit = count[:, None] if isinstance(count, torch.Tensor) and count.dim() == 1 else count  # [N, 1]
    chosen = (rank < limit) & masked
    if threshold is not None:
        chosen |= masked & (confidence > threshold)
    return chosen


CURRICULA = ("linear", "cosine")


@dataclass(kw_only=True)
class LengthCurriculum:
    """Generation length grows from ``min_length`` to ``max_length`` over ``warmup_steps``.

    ``linear`` (the paper): ``L_s = min(L_max, L_min + floor(s / S_warm * (L_max - L_min)))`` at
    training step ``s``. ``cosine`` (the reference launcher): ``L_min + (L_max - L_min) * (1 -
    cos(pi/2 * s / S_warm))``, rounded to a whole number of blocks, slow at first and fast at the end.
    """

    min_length: int = 100
    """L_min: response tokens at step 0."""
    max_length: int = 4000
    """L_max: response tokens once the ramp is over."""
    warmup_steps: int = 100
    """S_warm: steps of the ramp (0: always ``max_length``)."""
    shape: str = "linear"
    """'linear' or 'cosine'."""
    block_size: int = 1
    """The cosine ramp rounds to a multiple of this (the student's block size)."""

    def __post_init__(self) -> None:
        if self.shape not in CURRICULA:
            raise ConfigError(f"curriculum shape must be one of {CURRICULA}, got {self.shape!r}")
        if self.block_size < 1:
            raise ConfigError(f"curriculum.block_size must be >= 1, got {self.block_size}")
        if self.min_length < 1:
            raise ConfigError(f"curriculum.min_length must be >= 1, got {self.min_length}")
        if self.max_length < self.min_length:
            raise ConfigError(
                f"curriculum.max_length={self.max_length} is below min_length={self.min_length}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"curriculum.warmup_steps must be >= 0, got {self.warmup_steps}")

    def length(self, step: int) -> int:
        """Rollout length L_s at training step ``step`` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.warmup_steps == 0:
            return self.max_length
        span = self.max_length - self.min_length
        if self.shape == "cosine":
            frac = 1.0 - math.cos(math.pi / 2 * min(step, self.warmup_steps) / self.warmup_steps)
            raw = self.min_length + span * frac
            return min(self.max_length, max(self.block_size, self.block_size * round(raw / self.block_size)))
        # Integer arithmetic: floor(s * span / S_warm) == floor(s / S_warm * span) without float error.
        return min(self.max_length, self.min_length + (step * span) // self.warmup_steps)
