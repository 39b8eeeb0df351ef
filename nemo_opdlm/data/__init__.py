"""Prompt datasets for rollouts (and reference responses for off-policy KD / SFT).

The names below load on first use (PEP 562): reading and checking data needs no torch, so that
``opdlm eval --help`` and the config checks that read prompt files do not wait for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    **dict.fromkeys(("DataError", "Example", "PromptDataConfig", "PromptSet", "left_pad", "load_prompts",
                     "right_pad"), "nemo_opdlm.data.prompts"),
    **dict.fromkeys(("PromptBatch", "PromptLoader", "ShardedSampler"), "nemo_opdlm.data.sampler"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'nemo_opdlm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
