"""Qwen2.5 recipes: a 32B-class Qwen2.5 teacher distilled into Qwen2.5-7B.

Qwen2.5 and Qwen3 share their BPE merges but not their embedding size (152,064 vs 151,936 rows)
or their specials, so a Qwen2.5 teacher needs a Qwen2.5 student: the KL compares distributions
over one vocabulary. ``RunConfig`` refuses the mixed pair.
"""

from __future__ import annotations

from nemo_opdlm.config import RunConfig
from nemo_opdlm.recipes import models as m
from nemo_opdlm.recipes.base import paper_run, recipe, teacher_model, training_model


@recipe(nodes=1, gpus_per_node=8)
def qwen25_32b_tp4_pp1_to_7b_tp2_pp1_8g() -> RunConfig:
    """Qwen2.5-32B-Instruct teacher (TP=4, DP=2) -> Qwen2.5-7B-Instruct student (TP=2, DP=4), top-16 KL.

    The teacher has its own layout (``parallel.teacher``): sharing one, the 32B teacher forced the 7B
    student to TP=4 to fit, halving its data parallelism. TP=4 is the teacher's smallest TP that
    leaves about a tenth of the GPU free (``opdlm plan``)."""
    return paper_run(name="qwen25_32b_tp4_pp1_to_7b_tp2_pp1_8g", student=training_model(m.qwen25_7b()),
                     teacher=teacher_model(m.qwen25_32b()), mask_token_id=m.QWEN25_MASK_ID, tp=2, teacher_tp=4,
                     teacher_hf="hf/Qwen2.5-32B-Instruct", student_hf="hf/Qwen2.5-7B-Instruct")
