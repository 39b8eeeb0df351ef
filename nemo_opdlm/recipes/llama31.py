"""Llama 3.1 recipes: 8B self-distillation and the 70B teacher -> 8B student.

``llama31_70b_to_8b_tp8_pp1_16g``: both models at TP=8 inside a node (the 70B teacher's 141 GB of
bf16 weights become 17.6 GB per GPU), DP=2 across two nodes.
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


@recipe(nodes=2, gpus_per_node=8)
def llama31_70b_to_8b_tp8_pp1_16g() -> RunConfig:
    """Llama-3.1-70B-Instruct teacher -> Llama-3.1-8B-Instruct student, top-16 KL, TP=8, DP=2."""
    return paper_run(name="llama31_70b_to_8b_tp8_pp1_16g", student=training_model(m.llama31_8b()),
                     teacher=teacher_model(m.llama31_70b()), mask_token_id=m.LLAMA31_MASK_ID, tp=8,
                     teacher_hf="hf/Llama-3.1-70B-Instruct", student_hf="hf/Llama-3.1-8B-Instruct")


@recipe(nodes=4, gpus_per_node=8)
def llama31_70b_to_8b_tp8_pp2_32g() -> RunConfig:
    """The same on four nodes with PP=2 (80 and 32 layers split in halves): DP=2, half the weights per GPU."""
    return paper_run(name="llama31_70b_to_8b_tp8_pp2_32g", student=training_model(m.llama31_8b()),
                     teacher=teacher_model(m.llama31_70b()), mask_token_id=m.LLAMA31_MASK_ID, tp=8, pp=2,
                     teacher_hf="hf/Llama-3.1-70B-Instruct", student_hf="hf/Llama-3.1-8B-Instruct")
