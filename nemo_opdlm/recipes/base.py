"""What every recipe shares: the paper's hyperparameters and the cluster shape a recipe is meant for.

One job: turn (student shape, teacher shape, layout, checkpoint paths) into a complete
``RunConfig`` with the paper's defaults, and record, per recipe function, the cluster it was
sized for (``opdlm plan`` checks it there unless told otherwise). Non-goals: model shapes
(``recipes/models.py``), validation (``RunConfig`` and ``nemo_opdlm/plan/``).

The defaults (Su et al. 2026, arXiv 2606.06712): AdamW, lr 1e-5 -> 1e-6 cosine with 5 warm-up
steps, grad clip 1.0, bf16, activation recompute; block 4; dynamic decoding with threshold 0.9,
4 rounds per block, temperature 1; length curriculum 100 -> 4000 tokens over 100 steps; 128
prompts per step; KL over the full vocabulary below 4B parameters and over the teacher's top-16
tokens from 4B up.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from nemo_opdlm.config import (
    DistillConfig, InitConfig, OptimConfig, ParallelLayout, PromptDataConfig, RolloutConfig, RunConfig,
    TrainConfig,
)
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.runtime.distributed import TeacherLayout

PAPER_TOPK = 16
"""Teacher top-k of the KL at >= 4B parameters."""
TOPK_FROM_PARAMS = 3.0e9
"""Students at least this large use the top-k KL (Qwen3-4B has 4.0e9, Qwen3-1.7B 2.0e9)."""
PROMPT_TOKENS = 1024
"""Longest prompt kept (after the chat template); rows are [prompt | x0 | xt] = 1024 + 2 * 4000."""


@dataclass(frozen=True)
class ClusterShape:
    """The machines a recipe is sized for."""

    nodes: int
    gpus_per_node: int
    gpu: str = "h100-80g"
    """A key of ``nemo_opdlm.plan.layout.GPUS`` ('cpu' for the tiny CPU recipes)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


CLUSTERS: dict[str, ClusterShape] = {}
"""Recipe function name -> the cluster it is sized for (filled by :func:`recipe`)."""

F = TypeVar("F", bound=Callable[..., RunConfig])


def recipe(*, nodes: int, gpus_per_node: int, gpu: str = "h100-80g") -> Callable[[F], F]:
    """Register a recipe function with its intended cluster shape."""

    def wrap(fn: F) -> F:
        shape = ClusterShape(nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu)
        CLUSTERS[fn.__name__] = shape
        fn.cluster = shape  # type: ignore[attr-defined]
        return fn

    return wrap


def use_topk(student: ModelConfig) -> Optional[int]:
    """The paper's KL support: full vocabulary for small students, top-16 from 4B up."""
    return PAPER_TOPK if approx_params(student) >= TOPK_FROM_PARAMS else None


def approx_params(m: ModelConfig) -> float:
    """Parameter count of a decoder (untied output layer counted), for choosing defaults."""
    hd = m.kv_channels
    attn = m.hidden_size * hd * (m.num_attention_heads * 2 + m.num_query_groups * 2)
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    emb = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    return float(m.num_layers * (attn + mlp) + emb)


def training_model(shape: ModelConfig, **overrides: Any) -> ModelConfig:
    """A shape set up for training on GPUs: bf16, full recompute, FP8 GEMMs where the machine that
    builds the model has TE and Hopper (``fp8='auto'``: declared here, resolved at build time, so
    ``opdlm plan`` on a login node plans the config the job runs)."""
    fields: dict[str, Any] = dict(params_dtype="bfloat16", recompute="full", attention_backend="auto",
                                  linear_impl="auto", fp8="auto")
    fields.update(overrides)
    return shape.replace(**fields)


def teacher_model(shape: ModelConfig, **overrides: Any) -> ModelConfig:
    """A frozen teacher: bf16, no recompute (no backward), FP8 GEMMs as for the student."""
    fields: dict[str, Any] = dict(params_dtype="bfloat16", recompute="none", attention_backend="auto",
                                  linear_impl="auto", fp8="auto")
    fields.update(overrides)
    return shape.replace(**fields)


def paper_run(
    *,
    name: str,
    student: ModelConfig,
    mask_token_id: int,
    tp: int,
    pp: int = 1,
    teacher: Optional[ModelConfig] = None,
    teacher_tp: Optional[int] = None,
    teacher_pp: int = 1,
    teacher_hf: str,
    student_hf: Optional[str] = None,
    data_path: str = "data/prompts.jsonl",
    chat_template_kwargs: Optional[dict[str, Any]] = None,
    steps: int = 480,
    top_k: Optional[int] | str = "paper",
    teacher_offload: bool = False,
    distributed_optimizer: bool = True,
) -> RunConfig:
    """A complete RunConfig with the paper's hyperparameters.

    Args:
        name: the recipe's name (run and checkpoint directory).
        student: the student's architecture, already set up with :func:`training_model`.
        mask_token_id: an id the tokenizer never produces (a reserved / unused embedding row).
        tp, pp: the student's TP/PP layout, the teacher's too unless ``teacher_tp`` is given; DP is the
            rest of the world.
        teacher: a different (larger) teacher architecture, or None for self-distillation.
        teacher_tp, teacher_pp: the teacher's own layout on the same ranks (``parallel.teacher``), for a
            teacher so much larger that sharing its TP would force the student to a TP that only slows
            it; None: the teacher shares the student's layout.
        teacher_hf: HF directory of the teacher (also the tokenizer's).
        student_hf: HF directory of the student's initial weights (None: the teacher's).
        data_path: prompt file; override with ``data.path=...``.
        chat_template_kwargs: extra chat-template variables (Qwen3: ``enable_thinking``).
        steps: optimizer steps (one rollout batch of 128 prompts each; ~480 for 8B in the paper).
        top_k: KL support; 'paper' picks full vocabulary below 4B and top-16 from 4B up.
        teacher_offload: keep the teacher on the CPU between its forwards.
        distributed_optimizer: shard fp32 master weights and Adam moments over DP.
    """
    if top_k == "paper":
        top_k = use_topk(student)
    return RunConfig(
        name=name,
        model=student,
        teacher_model=teacher,
        diffusion=DiffusionConfig(block_size=4, mask_token_id=mask_token_id),
        parallel=ParallelLayout(tp=tp, pp=pp,
                                teacher=None if teacher_tp is None else TeacherLayout(tp=teacher_tp, pp=teacher_pp)),
        init=InitConfig(teacher_hf=teacher_hf, student_hf=student_hf),
        data=PromptDataConfig(
            path=data_path,
            max_prompt_tokens=PROMPT_TOKENS,
            chat_template_kwargs=dict(chat_template_kwargs or {}),
        ),
        rollout=RolloutConfig(
            mode="dynamic", threshold=0.9, steps_per_block=4, temperature=1.0, top_k=0, top_p=1.0,
            min_length=100, max_length=4000, curriculum_steps=100,
        ),
        distill=DistillConfig(method="opdlm", top_k=top_k, exclude_eos=True, teacher_offload=teacher_offload),
        optim=OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=5, weight_decay=0.0, clip_grad=1.0,
                          distributed_optimizer=distributed_optimizer),
        train=TrainConfig(steps=steps, prompts_per_step=128, micro_batch_size=1, save_every=20,
                          save_dir=os.path.join("runs", name), log_every=1),
    )


def continued_at_block(cfg: RunConfig, *, name: str, block_size: int, steps: int) -> RunConfig:
    """``cfg``'s conversion continued at a larger block: the same run directory (``train.save_dir``),
    so that starting it resumes the last checkpoint (weights, optimizer, data cursor) and trains on
    to step ``steps`` at ``block_size``. The rollouts, the states, the [MASK] layout and the block
    schedule follow ``diffusion.block_size`` (``rollout.steps_per_block`` unset: static rows decode
    one token per round at any block); a resume that changes anything else about the model is
    refused (``training.run_config.check_resume``). SDAR gets its block 8-64 models by continued
    training from block 4 in the same way."""
    if block_size <= cfg.diffusion.block_size:
        raise ValueError(f"a continuation goes to a larger block: {block_size} <= {cfg.diffusion.block_size}")
    if steps <= cfg.train.steps:
        raise ValueError(f"a continuation trains past the run's {cfg.train.steps} steps, got steps={steps}")
    return dataclasses.replace(cfg, name=name, diffusion=dataclasses.replace(cfg.diffusion, block_size=block_size),
                               rollout=dataclasses.replace(cfg.rollout, steps_per_block=None),
                               train=dataclasses.replace(cfg.train, steps=steps))
