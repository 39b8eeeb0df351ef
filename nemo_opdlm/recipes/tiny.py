"""Tiny CPU recipes for tests and smoke runs: a 2-layer random Qwen3-shaped model on arithmetic prompts.

One job: configs small enough for two gloo processes on a laptop CPU, plus the helpers a test uses
to write what they read (a random HF checkpoint with the synthetic task's tokenizer, and prompt
files) into a temporary directory. Point a recipe at them with overrides::

    opdlm train --recipe tiny:tiny_self_tp1_pp1_2g init.teacher_hf=/tmp/t/hf data.path=/tmp/t/train.jsonl

Non-goals: learning anything in particular (the model is random; ``nemo_opdlm/eval/synthetic.py``
drives the real CPU demo).
"""

from __future__ import annotations

import os
from typing import Any

from nemo_opdlm.config import (
    DistillConfig, InitConfig, OptimConfig, ParallelLayout, PromptDataConfig, RolloutConfig, RunConfig,
    TrainConfig,
)
from nemo_opdlm.demo import conversion_config, teacher_config
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.recipes.base import recipe

MASK_ID = 2
"""[MASK] in the synthetic task's tokenizer ([PAD]=0, [EOS]=1, [MASK]=2, [UNK]=3)."""
VOCAB = 32
"""Embedding rows: the task's 25 tokens rounded up (rows 25..31 are never produced)."""


def tiny_shape(num_layers: int = 2, **overrides: Any) -> ModelConfig:
    """2 layers x 64, FFN 128, 4 query heads / 2 KV groups of 16, qk-norm, tied: Qwen3 in miniature."""
    fields: dict[str, Any] = dict(family="qwen3", num_layers=num_layers, hidden_size=64, ffn_hidden_size=128,
                                  num_attention_heads=4, num_query_groups=2, vocab_size=VOCAB,
                                  make_vocab_size_divisible_by=8, max_position_embeddings=256,
                                  rotary_base=10000.0, qk_layernorm=True, tie_word_embeddings=True,
                                  params_dtype="float32", attention_backend="sdpa", linear_impl="local")
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_run(name: str, *, tp: int = 1, pp: int = 1, teacher_layers: int | None = None,
             top_k: int | None = None) -> RunConfig:
    """A 2-step CPU run: 4 prompts per step, responses of 8 -> 16 tokens, block 4."""
    return RunConfig(
        name=name,
        model=tiny_shape(),
        teacher_model=None if teacher_layers is None else tiny_shape(teacher_layers),
        diffusion=DiffusionConfig(block_size=4, mask_token_id=MASK_ID),
        parallel=ParallelLayout(tp=tp, pp=pp),
        init=InitConfig(teacher_hf="data/tiny/hf_teacher",
                        student_hf=None if teacher_layers is None else "data/tiny/hf_student"),
        data=PromptDataConfig(path="data/tiny/train.jsonl", max_prompt_tokens=32, chat_template="never"),
        rollout=RolloutConfig(mode="dynamic", threshold=0.9, steps_per_block=4, temperature=1.0,
                              min_length=8, max_length=16, curriculum_steps=2),
        distill=DistillConfig(method="opdlm", top_k=top_k),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1, distributed_optimizer=False),
        train=TrainConfig(steps=2, prompts_per_step=4, micro_batch_size=1, save_every=1,
                          save_dir=os.path.join("runs", name), seed=1234),
    )


@recipe(nodes=1, gpus_per_node=2, gpu="cpu")
def tiny_self_tp1_pp1_2g() -> RunConfig:
    """Self-distillation, DP=2 (the Slurm smoke test's recipe)."""
    return tiny_run("tiny_self_tp1_pp1_2g")


@recipe(nodes=1, gpus_per_node=2, gpu="cpu")
def tiny_self_tp2_pp1_2g() -> RunConfig:
    """Self-distillation, TP=2, top-4 KL."""
    return tiny_run("tiny_self_tp2_pp1_2g", tp=2, top_k=4)


@recipe(nodes=1, gpus_per_node=2, gpu="cpu")
def tiny_self_tp1_pp2_2g() -> RunConfig:
    """Self-distillation, PP=2 (one layer per stage)."""
    return tiny_run("tiny_self_tp1_pp2_2g", pp=2)


@recipe(nodes=1, gpus_per_node=2, gpu="cpu")
def tiny_4l_to_2l_tp1_pp1_2g() -> RunConfig:
    """A 4-layer teacher -> the 2-layer student (the larger-teacher path), DP=2."""
    return tiny_run("tiny_4l_to_2l_tp1_pp1_2g", teacher_layers=4)


@recipe(nodes=1, gpus_per_node=1, gpu="cpu")
def tiny_teacher_4l_tp1_pp1_1g() -> RunConfig:
    """The demo's AR teacher: 4 layers x 128 pre-trained from random weights on a synthetic task
    (750 steps; ``opdlm demo`` writes the task files under runs/demo/task)."""
    return teacher_config()


@recipe(nodes=1, gpus_per_node=1, gpu="cpu")
def tiny_convert_4l_tp1_pp1_1g() -> RunConfig:
    """The demo's OPDLM conversion of that teacher: the settings measured to keep >= 95% of a tiny
    teacher's accuracy (``nemo_opdlm.demo.conversion_config`` says why each differs from the paper's).
    Convert your own tiny teacher with ``init.teacher_checkpoint=... data.path=... init.tokenizer=...``
    (and ``model.*`` for another shape)."""
    return conversion_config()


# --- files a test writes ----------------------------------------------------------------------

def hf_config(model: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` of a tiny shape (Qwen3ForCausalLM, transformers-5 spelling)."""
    from nemo_opdlm.convert.hf_config import hf_config_from_model

    cfg = hf_config_from_model(model)
    cfg.update(bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return cfg


def write_hf_model(directory: str, model: ModelConfig | None = None, seed: int = 0) -> str:
    """Save a random-weight HF checkpoint of ``model`` (default: the tiny shape) with the task's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_opdlm.eval.synthetic import build_tokenizer

    model = model or tiny_shape()
    raw = hf_config(model)
    config = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items() if k != "architectures"})
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def write_prompts(directory: str, num_train: int = 32, seed: int = 0) -> str:
    """Arithmetic prompts (with reference responses) as ``train.jsonl``; returns its path."""
    from nemo_opdlm.eval.synthetic import ArithmeticConfig, write_task

    return write_task(directory, ArithmeticConfig(), num_train=num_train, num_test=4, seed=seed).train
