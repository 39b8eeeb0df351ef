"""How a model decodes during evaluation: the settings every score is printed with.

One job: ``DecodeSettings``, the evaluation's decoding schema (``rollout.decode.DecodeConfig`` plus
what evaluation adds: block size override, generation length, chat template, few-shot count, batch
size, seed), and nothing heavy to import, so that ``opdlm eval --help`` and the lm-eval adapter's
argument parsing start in a blink. Non-goals: decoding and scoring (``evaluate.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from nemo_opdlm.errors import ConfigError
from nemo_opdlm.rollout.decode import DecodeConfig

if TYPE_CHECKING:
    from nemo_opdlm.models.config import DiffusionConfig
    from nemo_opdlm.rollout.sampler import SamplerConfig


@dataclass(kw_only=True)
class DecodeSettings(DecodeConfig):
    """How the model decodes during evaluation (printed next to every score): the decoding
    settings (``DecodeConfig``; its defaults are the paper's evaluation, greedy and 1 token per
    round) and what evaluation adds."""

    block_size: Optional[int] = None
    """Tokens per block; None = the model's (``diffusion.block_size`` of its checkpoint)."""
    max_new_tokens: int = 256
    """Generation length limit."""
    chat_template: str = "auto"
    """'auto' (use the tokenizer's when it has one), 'always' or 'never'."""
    num_fewshot: int = 0
    """Few-shot examples before each question (recorded here; the task holds them)."""
    batch_size: int = 16
    """Prompts decoded together."""
    seed: int = 0
    """Sampler seed (only matters with temperature > 0)."""

    @property
    def where(self) -> str:
        return "eval"

    def __post_init__(self) -> None:
        self.check_values()
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval {name} must be >= 1, got {getattr(self, name)}")
        if self.block_size is not None:
            if self.block_size < 1:
                raise ConfigError(f"eval block_size must be >= 1, got {self.block_size}")
            if self.mode != "ar":
                self.rounds_per_block(self.block_size)

    def describe(self) -> str:  # type: ignore[override]
        """One line with every setting that changes the score."""
        return (f"{DecodeConfig.describe(self, self.block_size)} | gen={self.max_new_tokens} "
                f"T={self.temperature:g} chat={self.chat_template} fewshot={self.num_fewshot}")

    def for_model(self, diffusion: Optional["DiffusionConfig"]) -> "DecodeSettings":
        """These settings with the block size resolved: this one, else the model's."""
        if self.mode == "ar" or self.block_size is not None:
            return self
        if diffusion is None:
            raise ConfigError("block-diffusion evaluation needs the model's [MASK] id (mask_token_id) and block size")
        return dataclasses.replace(self, block_size=diffusion.block_size)

    def sampler_config(self, *, diffusion: Optional["DiffusionConfig"], eos_token_ids: Sequence[int],
                       pad_token_id: Optional[int]) -> "SamplerConfig":
        """The sampler for these settings (block size resolved, see ``for_model``) on a model whose
        block-diffusion facts are ``diffusion`` (None: an AR model, ``mode='ar'`` only)."""
        from nemo_opdlm.rollout.sampler import SamplerConfig

        settings = self.for_model(diffusion)  # refuses block diffusion without the model's facts
        if settings.mode != "ar":
            diffusion = dataclasses.replace(diffusion, block_size=settings.block_size)
        return SamplerConfig(decode=settings, diffusion=None if settings.mode == "ar" else diffusion,
                             max_new_tokens=settings.max_new_tokens, eos_token_ids=tuple(eos_token_ids),
                             pad_token_id=pad_token_id, seed=settings.seed)
