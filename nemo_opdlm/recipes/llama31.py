"""Llama 3.1 recipes: 8B self-distillation and the 70B teacher -> 8B student.

The 70B teacher's 141 GB of bf16 weights need TP=8 to fit beside the student (17.6 GB per GPU),
but an 8B student at TP=8 spends its steps in TP communication and decodes its rollouts in only
DP=2 groups. So the teacher runs at its own layout on the same GPUs (``parallel.teacher``): TP=8
inside a node, while the student trains at TP=2 with four times the data parallelism. The names
spell both layouts: ``llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g`` is the 70B teacher at TP=8, PP=1
and the 8B student at TP=2, PP=1 on 16 GPUs.
"""

from __future__ import annotations

from nemo_opdlm.config import RunConfig
from nemo_opdlm.recipes import models as m
from nemo_opdlm.recipes.base import paper_run, recipe, teacher_model, training_model


@recipe(nodes=1, gpus_per_node=8)
def llama31_8b_self_tp2_pp1_8g() -> RunConfig:
    """Llama-3.1-8B-Instruct -> itself, top-16 KL, TP=2, DP=4."""
    return paper_run(name="llama31_8b_self_tp2_pp1_8g", student=training_model(m.llama31_8b()),
                     mask_token_id=m.LLAMA31_MASK_ID, tp=2, teacher_hf="hf/Llama-3.1-8B-Instruct")


def _70b_to_8b(name: str) -> RunConfig:
    """The 70B teacher at TP=8 (one node per replica), the 8B student at TP=2, DP the rest."""
    return paper_run(name=name, student=training_model(m.llama31_8b()), teacher=teacher_model(m.llama31_70b()),
                     mask_token_id=m.LLAMA31_MASK_ID, tp=2, teacher_tp=8,
                     teacher_hf="hf/Llama-3.1-70B-Instruct", student_hf="hf/Llama-3.1-8B-Instruct")


@recipe(nodes=2, gpus_per_node=8)
def llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g() -> RunConfig:
    """Llama-3.1-70B-Instruct teacher (TP=8, DP=2) -> Llama-3.1-8B-Instruct student (TP=2, DP=8), top-16 KL."""
    return _70b_to_8b("llama31_70b_tp8_pp1_to_8b_tp2_pp1_16g")


@recipe(nodes=4, gpus_per_node=8)
def llama31_70b_tp8_pp1_to_8b_tp2_pp1_32g() -> RunConfig:
    """The same on four nodes: teacher DP=4, student DP=16 (half the rollouts per GPU). The teacher
    needs no PP: at TP=8 every GPU still fits (``opdlm plan``), and PP=2 would only add a pipeline
    that crosses nodes."""
    return _70b_to_8b("llama31_70b_tp8_pp1_to_8b_tp2_pp1_32g")
