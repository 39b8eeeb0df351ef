"""How a model decodes: one schema for rollouts, evaluation, the lm-eval adapter and the demo.

One job: the decoding settings every decoder takes (mode, threshold, rounds per block, sampling,
cache options), each default written once and validated once, here. The training rollouts
(``config.RolloutConfig``) and the evaluation (``eval.evaluate.DecodeSettings``) extend it with
what only they have (the length curriculum; chat template, batch size...), and the sampler takes it
whole (``sampler.SamplerConfig.decode``). Non-goals: the model's own facts (block size, [MASK] id,
shifted logits: ``models.config.DiffusionConfig``), the decoding itself (``sampler.py``).

The defaults are the paper's evaluation: greedy, 1 token per round (``static`` with
``steps_per_block`` = the block size). Training rollouts differ in two fields, which
``RolloutConfig`` states: threshold decoding and temperature 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nemo_opdlm.errors import ConfigError

BLOCK_MODES = ("static", "dynamic")
"""Block diffusion: ``static``, the k most confident positions per round; ``dynamic``, every position
above ``threshold`` and at least k."""
MODES = ("ar",) + BLOCK_MODES
"""Plus ``ar``: causal next-token decoding (the teacher's way, block size 1)."""


@dataclass(kw_only=True)
class DecodeConfig:
    """Decoding settings (the section name in error messages is given by ``where``)."""

    mode: str = "static"
    """'static' (block_size / steps_per_block tokens per round), 'dynamic' (every position whose
    confidence exceeds ``threshold``, at least the static count) or 'ar' (causal, one token per
    forward: the AR teacher)."""
    threshold: float = 0.9
    """Dynamic mode: unmask every position whose raw-softmax confidence is strictly above this."""
    steps_per_block: Optional[int] = None
    """Rounds per block of the static schedule (and the minimum per round in dynamic mode); None =
    the block size, i.e. 1 token per round (the paper's)."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    use_cache: bool = True
    """Block KV cache (False: recompute every round, the reference path)."""
    pad_commit_slots: Optional[bool] = None
    """One forward per round with PAD commit slots (True) or committing / other rows as two forwards
    (False); None = True on GPU (memory-bound: fewer launches win), False on CPU (fewer FLOPs win)."""

    def __post_init__(self) -> None:
        self.check_values()

    @property
    def where(self) -> str:
        """The key prefix errors name (``rollout`` in a run config, ``eval`` elsewhere)."""
        return "decode"

    def check_values(self, modes: tuple[str, ...] = MODES) -> None:
        w = self.where
        if self.mode not in modes:
            raise ConfigError(f"{w}.mode must be one of {modes}, got {self.mode!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"{w}.threshold must be in (0, 1] (a probability; 0 would unmask a whole block "
                              f"in its first round), got {self.threshold}")
        if self.steps_per_block is not None and self.steps_per_block < 1:
            raise ConfigError(f"{w}.steps_per_block must be >= 1 (or null: the block size), got {self.steps_per_block}")
        if self.temperature < 0:
            raise ConfigError(f"{w}.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"{w}.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{w}.top_p must be in (0, 1] (1 = off), got {self.top_p}")

    def rounds_per_block(self, block_size: int) -> int:
        """Rounds of the static schedule in a block of ``block_size`` (checked against it)."""
        rounds = self.steps_per_block or block_size
        if rounds > block_size:
            raise ConfigError(f"{self.where}.steps_per_block={rounds} exceeds the block size "
                              f"(diffusion.block_size={block_size}): a round unmasks at least one token of the block")
        return rounds

    def describe(self, block_size: Optional[int]) -> str:
        """The decoding part of a score's label, e.g. ``block=4 dynamic thr=0.9``."""
        if self.mode == "ar":
            return "AR (causal, 1 token/forward)"
        assert block_size is not None
        if self.mode == "static":
            return f"block={block_size} static {block_size // self.rounds_per_block(block_size)} tok/round"
        return f"block={block_size} dynamic thr={self.threshold:g}"
