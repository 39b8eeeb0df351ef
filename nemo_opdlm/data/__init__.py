"""Prompt datasets for rollouts (and reference responses for off-policy KD / SFT)."""

from nemo_opdlm.data.prompts import (
    DataError,
    Example,
    PromptDataConfig,
    PromptSet,
    left_pad,
    load_prompts,
    right_pad,
)
from nemo_opdlm.data.sampler import PromptBatch, PromptLoader, ShardedSampler

__all__ = [
    "DataError", "Example", "PromptDataConfig", "PromptSet", "left_pad", "load_prompts", "right_pad",
    "PromptBatch", "PromptLoader", "ShardedSampler",
]
