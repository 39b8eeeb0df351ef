"""Recipes: Python functions returning a complete ``RunConfig``, named for model and topology.

Call one from the command line as ``module:function`` or by its bare name (every recipe is
re-exported here), then override any key::

    opdlm plan qwen3_8b_self_tp2_pp1_8g
    opdlm train --recipe qwen3:qwen3_8b_self_tp2_pp1_8g train.steps=10 data.path=/data/prompts.jsonl

``CLUSTERS`` maps each recipe to the cluster it is sized for; ``opdlm plan`` checks it there.
Modules: ``models`` (architectures from the HF configs), ``base`` (the paper's defaults),
``qwen3``, ``qwen25``, ``llama31`` (GPU recipes), ``tiny`` (CPU tests and smoke runs).
"""

from __future__ import annotations

from typing import Callable

from nemo_opdlm.config import RunConfig
from nemo_opdlm.recipes.base import CLUSTERS, ClusterShape, recipe
from nemo_opdlm.recipes.llama31 import (
    llama31_8b_self_tp2_pp1_8g, llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g, llama31_70b_tp8_pp1_to_8b_tp2_pp1_32g,
)
from nemo_opdlm.recipes.qwen3 import (
    qwen3_0_6b_self_b8_tp1_pp1_8g, qwen3_0_6b_self_b16_tp1_pp1_8g, qwen3_0_6b_self_tp1_pp1_8g, qwen3_1_7b_self_tp1_pp1_8g, qwen3_4b_self_tp1_pp1_8g, qwen3_4b_to_0_6b_tp1_pp1_8g,
    qwen3_8b_self_tp2_pp1_8g, qwen3_8b_self_tp2_pp1_16g, qwen3_8b_to_4b_tp1_pp1_8g, qwen3_32b_tp8_pp1_to_8b_tp2_pp1_8g,
    qwen3_32b_tp4_pp1_to_8b_tp2_pp1_16g,
)
from nemo_opdlm.recipes.qwen25 import qwen25_7b_to_1_5b_tp1_pp1_8g, qwen25_32b_tp4_pp1_to_7b_tp2_pp1_8g
from nemo_opdlm.recipes.tiny import (
    tiny_4l_to_2l_tp1_pp1_2g, tiny_convert_4l_b8_tp1_pp1_1g, tiny_convert_4l_b16_tp1_pp1_1g, tiny_convert_4l_tp1_pp1_1g, tiny_self_tp1_pp1_2g, tiny_self_tp1_pp2_2g,
    tiny_self_tp2_pp1_2g, tiny_teacher_4l_tp1_pp1_1g,
)

GPU_RECIPES: dict[str, Callable[[], RunConfig]] = {
    fn.__name__: fn for fn in (
        qwen3_0_6b_self_tp1_pp1_8g, qwen3_0_6b_self_b8_tp1_pp1_8g, qwen3_0_6b_self_b16_tp1_pp1_8g,
        qwen3_1_7b_self_tp1_pp1_8g, qwen3_4b_self_tp1_pp1_8g, qwen3_8b_self_tp2_pp1_8g,
        qwen3_8b_self_tp2_pp1_16g, qwen3_4b_to_0_6b_tp1_pp1_8g, qwen3_8b_to_4b_tp1_pp1_8g,
        qwen3_32b_tp8_pp1_to_8b_tp2_pp1_8g, qwen3_32b_tp4_pp1_to_8b_tp2_pp1_16g, qwen25_32b_tp4_pp1_to_7b_tp2_pp1_8g, qwen25_7b_to_1_5b_tp1_pp1_8g,
        llama31_8b_self_tp2_pp1_8g, llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g, llama31_70b_tp8_pp1_to_8b_tp2_pp1_32g,
    )
}
"""The recipes sized for GPU clusters (what ``opdlm plan`` must accept on their cluster)."""
CPU_RECIPES: dict[str, Callable[[], RunConfig]] = {
    fn.__name__: fn for fn in (tiny_self_tp1_pp1_2g, tiny_self_tp2_pp1_2g, tiny_self_tp1_pp2_2g,
                               tiny_4l_to_2l_tp1_pp1_2g, tiny_teacher_4l_tp1_pp1_1g, tiny_convert_4l_tp1_pp1_1g,
                               tiny_convert_4l_b8_tp1_pp1_1g, tiny_convert_4l_b16_tp1_pp1_1g)
}
"""Tiny recipes for tests and CPU smoke runs."""
ALL_RECIPES = {**GPU_RECIPES, **CPU_RECIPES}

__all__ = ["ALL_RECIPES", "CLUSTERS", "CPU_RECIPES", "ClusterShape", "GPU_RECIPES", "recipe", *ALL_RECIPES]
