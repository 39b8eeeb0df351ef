"""Qwen3 recipes: self-distillation at 0.6B-8B and larger Qwen3 teachers (4B -> 0.6B, 32B -> 8B).

Names spell teacher, student and layout: ``qwen3_8b_self_tp2_pp1_8g`` is Qwen3-8B distilled into
itself at TP=2, PP=1 on 8 GPUs (DP = 4); ``qwen3_8b_to_4b_tp1_pp1_8g`` distils Qwen3-8B into a
Qwen3-4B student, both at TP=1. A teacher with its own layout (``parallel.teacher``) has it spelt
after its size: ``qwen3_32b_tp8_pp1_to_8b_tp2_pp1_8g`` runs the 32B teacher at TP=8 and the 8B
student at TP=2 on the same 8 GPUs, because the TP the 32B teacher needs to fit would only slow the
8B student down. Its TP is the smallest that leaves about a tenth of the GPU free; a smaller TP
communicates less. Each recipe is sized (``opdlm plan``) for the H100-80GB nodes named in ``@recipe``.
"""

from __future__ import annotations

from nemo_opdlm.config import RunConfig
from nemo_opdlm.recipes import models as m
from nemo_opdlm.recipes.base import continued_at_block, paper_run, recipe, teacher_model, training_model


def _self(name: str, shape, hf_name: str, tp: int, pp: int = 1, **kw) -> RunConfig:
    return paper_run(name=name, student=training_model(shape()), mask_token_id=m.QWEN3_MASK_ID, tp=tp, pp=pp,
                     teacher_hf=f"hf/{hf_name}", chat_template_kwargs=m.QWEN3_CHAT, **kw)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_0_6b_self_tp1_pp1_8g() -> RunConfig:
    """Qwen3-0.6B -> itself, full-vocabulary KL, DP=8."""
    return _self("qwen3_0_6b_self_tp1_pp1_8g", m.qwen3_0_6b, "Qwen3-0.6B", tp=1)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_0_6b_self_b8_tp1_pp1_8g() -> RunConfig:
    """The Qwen3-0.6B conversion continued at block 8 (more tokens per round): run it after
    ``qwen3_0_6b_self_tp1_pp1_8g`` (same run directory, so it resumes that run's last checkpoint)
    for 240 more steps, half the block-4 stage's, as the reference's newer scripts continue OPD
    from a block-4 checkpoint."""
    return continued_at_block(qwen3_0_6b_self_tp1_pp1_8g(), name="qwen3_0_6b_self_b8_tp1_pp1_8g", block_size=8,
                              steps=720)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_0_6b_self_b16_tp1_pp1_8g() -> RunConfig:
    """... and at block 16 after that (240 more steps; the paper's Figure 3 reaches about 3.5 tokens
    per round at block 16)."""
    return continued_at_block(qwen3_0_6b_self_b8_tp1_pp1_8g(), name="qwen3_0_6b_self_b16_tp1_pp1_8g",
                              block_size=16, steps=960)


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


def _pair(name: str, teacher, student, teacher_hf: str, student_hf: str, tp: int, **kw) -> RunConfig:
    """A larger Qwen3 teacher distilled into a smaller Qwen3 student that starts from its own weights."""
    return paper_run(name=name, student=training_model(student()), teacher=teacher_model(teacher()),
                     mask_token_id=m.QWEN3_MASK_ID, tp=tp, teacher_hf=f"hf/{teacher_hf}",
                     student_hf=f"hf/{student_hf}", chat_template_kwargs=m.QWEN3_CHAT, **kw)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_4b_to_0_6b_tp1_pp1_8g() -> RunConfig:
    """Qwen3-4B teacher -> Qwen3-0.6B student (the paper: a larger teacher helps at 0.6B); full KL."""
    return _pair("qwen3_4b_to_0_6b_tp1_pp1_8g", m.qwen3_4b, m.qwen3_0_6b, "Qwen3-4B", "Qwen3-0.6B", tp=1)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_8b_to_4b_tp1_pp1_8g() -> RunConfig:
    """Qwen3-8B teacher -> Qwen3-4B student; top-16 KL."""
    return _pair("qwen3_8b_to_4b_tp1_pp1_8g", m.qwen3_8b, m.qwen3_4b, "Qwen3-8B", "Qwen3-4B", tp=1)


@recipe(nodes=1, gpus_per_node=8)
def qwen3_32b_tp8_pp1_to_8b_tp2_pp1_8g() -> RunConfig:
    """Qwen3-32B teacher (TP=8, DP=1) -> Qwen3-8B student (TP=2, DP=4) on one node; top-16 KL. The
    teacher at TP=4 would leave about 2 GiB free (``opdlm plan``), too little for an estimate."""
    return _pair("qwen3_32b_tp8_pp1_to_8b_tp2_pp1_8g", m.qwen3_32b, m.qwen3_8b, "Qwen3-32B", "Qwen3-8B",
                 tp=2, teacher_tp=8)


@recipe(nodes=2, gpus_per_node=8)
def qwen3_32b_tp4_pp1_to_8b_tp2_pp1_16g() -> RunConfig:
    """Qwen3-32B teacher (TP=4, DP=4) -> Qwen3-8B student (TP=2, DP=8) on two nodes; top-16 KL. Half
    the rollouts per GPU of the one-node recipe leave room for the teacher at TP=4, which communicates
    half as much per computation as at TP=8."""
    return _pair("qwen3_32b_tp4_pp1_to_8b_tp2_pp1_16g", m.qwen3_32b, m.qwen3_8b, "Qwen3-32B", "Qwen3-8B",
                 tp=2, teacher_tp=4)
