"""Qwen3 recipes: self-distillation at 0.6B-8B and larger Qwen3 teachers (4B -> 0.6B, 32B -> 8B).

Names spell teacher, student and layout: ``qwen3_8b_self_tp2_pp1_8g`` is Qwen3-8B distilled into
itself at TP=2, PP=1 on 8 GPUs (DP = 4); ``qwen3_32b_to_8b_tp8_pp1_8g`` distils Qwen3-32B into a
Qwen3-8B student. Each is sized (``opdlm plan``) for the H100-80GB nodes named in ``@recipe``.
"""

from __future__ import annotations

from nemo_opdlm.config import RunConfig
from nemo_opdlm.recipes import models as m
from nemo_opdlm.recipes.base import paper_run, recipe, teacher_model, training_model


def _self(name: str, shape, hf_name: str, tp: int, pp: int = 1, **kw) -> RunConfig:
    return paper_run(name=name, student=training_model(shape()), mask_token_id=m.QWEN3_MASK_ID, tp=tp, pp=pp,
                     teacher_hf=f"hf/{hf_name}", chat_template_kwargs=m.QWEN3_CHAT, **kw)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_0_6b_self_tp1_pp1_8g() -> RunConfig:
    """Qwen3-0.6B -> itself, full-vocabulary KL, DP=8."""
    return _self("qwen3_0_6b_self_tp1_pp1_8g", m.qwen3_0_6b, "Qwen3-0.6B", tp=1)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_1_7b_self_tp1_pp1_8g() -> RunConfig:
    """Qwen3-1.7B -> itself, full-vocabulary KL, DP=8."""
    return _self("qwen3_1_7b_self_tp1_pp1_8g", m.qwen3_1_7b, "Qwen3-1.7B", tp=1)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_4b_self_tp1_pp1_8g() -> RunConfig:
    """Qwen3-4B -> itself, top-16 KL, DP=8 (distributed optimizer)."""
    return _self("qwen3_4b_self_tp1_pp1_8g", m.qwen3_4b, "Qwen3-4B", tp=1)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_8b_self_tp2_pp1_8g() -> RunConfig:
    """Qwen3-8B -> itself (the paper's main result), top-16 KL, TP=2, DP=4."""
    return _self("qwen3_8b_self_tp2_pp1_8g", m.qwen3_8b, "Qwen3-8B", tp=2)


@recipe(nodes=2, gpus_per_node=8)
def qwen3_8b_self_tp2_pp1_16g() -> RunConfig:
    """Qwen3-8B -> itself on two nodes: TP=2 inside a node, DP=8 (half the rollouts per GPU)."""
    return _self("qwen3_8b_self_tp2_pp1_16g", m.qwen3_8b, "Qwen3-8B", tp=2)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_4b_to_0_6b_tp1_pp1_8g() -> RunConfig:
    """Qwen3-4B teacher -> Qwen3-0.6B student (the paper: a larger teacher helps at 0.6B); full KL."""
    name = "qwen3_4b_to_0_6b_tp1_pp1_8g"
    return paper_run(name=name, student=training_model(m.qwen3_0_6b()), teacher=teacher_model(m.qwen3_4b()),
                     mask_token_id=m.QWEN3_MASK_ID, tp=1, teacher_hf="hf/Qwen3-4B", student_hf="hf/Qwen3-0.6B",
                     chat_template_kwargs=m.QWEN3_CHAT)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_8b_to_4b_tp1_pp1_8g() -> RunConfig:
    """Qwen3-8B teacher -> Qwen3-4B student; top-16 KL."""
    name = "qwen3_8b_to_4b_tp1_pp1_8g"
    return paper_run(name=name, student=training_model(m.qwen3_4b()), teacher=teacher_model(m.qwen3_8b()),
                     mask_token_id=m.QWEN3_MASK_ID, tp=1, teacher_hf="hf/Qwen3-8B", student_hf="hf/Qwen3-4B",
                     chat_template_kwargs=m.QWEN3_CHAT)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_32b_to_8b_tp8_pp1_8g() -> RunConfig:
    """Qwen3-32B teacher -> Qwen3-8B student on one node: TP=8 (both models), DP=1; top-16 KL."""
    name = "qwen3_32b_to_8b_tp8_pp1_8g"
    return paper_run(name=name, student=training_model(m.qwen3_8b()), teacher=teacher_model(m.qwen3_32b()),
                     mask_token_id=m.QWEN3_MASK_ID, tp=8, teacher_hf="hf/Qwen3-32B", student_hf="hf/Qwen3-8B",
                     chat_template_kwargs=m.QWEN3_CHAT)


@recipe(nodes=2, gpus_per_node=8)
def qwen3_32b_to_8b_tp8_pp1_16g() -> RunConfig:
    """Qwen3-32B teacher -> Qwen3-8B student on two nodes: TP=8 inside a node, DP=2; top-16 KL."""
    name = "qwen3_32b_to_8b_tp8_pp1_16g"
    return paper_run(name=name, student=training_model(m.qwen3_8b()), teacher=teacher_model(m.qwen3_32b()),
                     mask_token_id=m.QWEN3_MASK_ID, tp=8, teacher_hf="hf/Qwen3-32B", student_hf="hf/Qwen3-8B",
                     chat_template_kwargs=m.QWEN3_CHAT)
