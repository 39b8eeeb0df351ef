"""Qwen2.5 recipes: Qwen2.5-32B distilled into Qwen2.5-7B, and Qwen2.5-7B into Qwen2.5-1.5B.

Qwen2.5 and Qwen3 share their BPE merges but not their specials, so a Qwen2.5 teacher needs a
Qwen2.5 student: the KL compares distributions over one tokenizer. Within Qwen2.5 the 7B and larger
have 152,064 embedding rows and the 0.5B-3B 151,936, the same 151,665 ids with less padding: the
teacher is read with the student's rows (``RunConfig.teacher_built``).
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


@recipe(nodes=1, gpus_per_node=8)
def qwen25_7b_to_1_5b_tp1_pp1_8g() -> RunConfig:
    """Qwen2.5-7B-Instruct teacher -> Qwen2.5-1.5B-Instruct student (TP=1, DP=8), full-vocabulary KL.

    The teacher's 152,064 vocabulary rows against the student's 151,936: the 128 rows past the student's
    are padding of the shared tokenizer, dropped when the teacher is read. The KL's targets are what
    ``base.use_topk`` picks for a student of this size."""
    return paper_run(name="qwen25_7b_to_1_5b_tp1_pp1_8g", student=training_model(m.qwen25_1_5b()),
                     teacher=teacher_model(m.qwen25_7b()), mask_token_id=m.QWEN25_MASK_ID, tp=1,
                     teacher_hf="hf/Qwen2.5-7B-Instruct", student_hf="hf/Qwen2.5-1.5B-Instruct")
