"""Tiny CPU recipes for tests and smoke runs: a 2-layer random Qwen3-shaped model on arithmetic prompts.

One job: configs small enough for two gloo processes on a laptop CPU (the tests write what they read,
a random HF checkpoint with the synthetic task's tokenizer and prompt files: ``tests/tiny.py``), and
the CPU demo's teacher and conversion. Point a recipe at your files with overrides::

    opdlm train --recipe tiny:tiny_self_tp1_pp1_2g init.teacher_hf=/tmp/t/hf data.path=/tmp/t/train.jsonl

Non-goals: learning anything in particular (the model is random; ``nemo_opdlm/eval/synthetic.py``
drives the real CPU demo).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from nemo_opdlm.config import (
    DistillConfig, InitConfig, OptimConfig, ParallelLayout, PromptDataConfig, RolloutConfig, RunConfig,
    TrainConfig,
)
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.recipes.base import continued_at_block, recipe

MASK_ID = 2
"""[MASK] in the synthetic task's tokenizer ([PAD]=0, [EOS]=1, [MASK]=2, [UNK]=3)."""
VOCAB = 32
"""Embedding rows: the task's 25 tokens rounded up (rows 25..31 are never produced)."""


# --- the CPU demo's teacher and conversion (``opdlm demo``, benchmarks/token_efficiency.py) ---------

MAX_NEW_TOKENS = 32
"""Rollout and evaluation length of the tiny tasks: the longest worked answer fits."""


def demo_shape(hidden_size: int = 128, num_layers: int = 4) -> ModelConfig:
    """The demo's decoder: ``tiny_shape`` at the demo's width (FFN twice the width), the automatic
    linear layers."""
    return tiny_shape(num_layers, hidden_size=hidden_size, ffn_hidden_size=2 * hidden_size, linear_impl="auto")


def _tiny_run(*, name: str, method: str, data_path: str, tokenizer: str, save_dir: str, steps: int, lr: float,
              warmup_steps: int, save_every: int, seed: int, prompts_per_step: int, hidden_size: int,
              num_layers: int, shift_logits: bool, static_fraction: float,
              teacher_checkpoint: Optional[str] = None, response_field: Optional[str] = "response",
              block_grid: Optional[str] = None):
    return RunConfig(
        name=name,
        model=demo_shape(hidden_size, num_layers),
        diffusion=DiffusionConfig(mask_token_id=MASK_ID, shift_logits=shift_logits,
                                  **({} if block_grid is None else {"block_grid": block_grid})),
        init=InitConfig(tokenizer=tokenizer, teacher_checkpoint=teacher_checkpoint),
        data=PromptDataConfig(path=data_path, response_field=response_field, chat_template="never",
                              max_prompt_tokens=32),
        rollout=RolloutConfig(static_fraction=static_fraction, min_length=MAX_NEW_TOKENS, max_length=MAX_NEW_TOKENS,
                              curriculum_steps=0),
        distill=DistillConfig(method=method),
        # a run shorter than its warm-up (the demo's CI size) warms up over all but its last step: a
        # warm-up of every step is refused (RunConfig._validate_warmup)
        optim=OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=min(warmup_steps, steps - 1)),
        train=TrainConfig(steps=steps, prompts_per_step=prompts_per_step, micro_batch_size=prompts_per_step,
                          seed=seed, log_every=max(1, min(25, steps // 10)), save_every=save_every,
                          save_dir=save_dir),
    )


def teacher_config(*, data_path: str = "runs/demo/task/train.jsonl", tokenizer: str = "runs/demo/task/tokenizer",
                   save_dir: str = "runs/demo/teacher", steps: int = 750, save_every: int = 250, seed: int = 1234,
                   prompts_per_step: int = 32, hidden_size: int = 128, num_layers: int = 4,
                   name: str = "tiny_teacher_4l_tp1_pp1_1g"):
    """AR pre-training of the tiny teacher from random weights (``distill.method='ar'``) on the
    task's responses: lr 2e-3 cosine to 2e-4, 10 warm-up steps."""
    return _tiny_run(name=name, method="ar", data_path=data_path, tokenizer=tokenizer, save_dir=save_dir,
                     steps=steps, lr=2e-3, warmup_steps=10, save_every=save_every, seed=seed,
                     prompts_per_step=prompts_per_step, hidden_size=hidden_size, num_layers=num_layers,
                     shift_logits=False, static_fraction=0.0)


def conversion_config(*, teacher_checkpoint: str = "runs/demo/teacher/step_0000750",
                      data_path: str = "runs/demo/task/train.jsonl", tokenizer: str = "runs/demo/task/tokenizer",
                      save_dir: str = "runs/demo/student", method: str = "opdlm", steps: int = 300,
                      save_every: int = 50, seed: int = 1234, prompts_per_step: int = 32, hidden_size: int = 128,
                      num_layers: int = 4, response_field: Optional[str] = "response",
                      block_grid: Optional[str] = None, name: str = "tiny_convert_4l_tp1_pp1_1g"):
    """Conversion of a tiny AR teacher into a block-4 student: the settings measured to work.

    ``benchmarks/token_efficiency.py`` runs them for every method, three seeds and both synthetic
    tasks. What differs from the paper's GPU recipes, and why (``docs/conversion.md``; the numbers are
    ``benchmarks/results/conversion_diagnostics.json``'s, arithmetic task, step 300 unless said):

    - ``diffusion.shift_logits``: read as an unshifted student, the teacher's weights answer the
      wrong position (held-out accuracy 0.02, KL 5.6 nats at every block position), and 300 steps
      only reach 0.37. Shifted, a block's first token is the teacher's own prediction (KL 0.23 at
      step 0) and the student is at 0.94 static / 0.95 threshold accuracy by step 150.
    - ``rollout.static_fraction=0.25``: once confident, threshold rollouts decode 88% of the
      tokens in a block's first round, so 91% of the loss tokens sit in fully masked blocks and
      the partly decoded blocks of static (1 token per round) evaluation go short: their KL is
      twice the rollouts' (0.128 vs 0.061); with a quarter of the rows static, 0.084.
    - lr 5e-4 (cosine to 5e-5, 10 warm-up steps) instead of 1e-5: a 0.8M-parameter model, batch 32.

    ``method`` picks the ablation (``random_mask``, ``off_policy``, ``sft``) under the same settings;
    ``response_field=None`` hides the file's responses (off-policy KD then uses the teacher's own
    rollouts); ``block_grid`` the grid (None: ``DiffusionConfig``'s default).
    """
    return _tiny_run(name=name, method=method, data_path=data_path, tokenizer=tokenizer,
                     save_dir=save_dir, steps=steps, lr=5e-4, warmup_steps=10, save_every=save_every, seed=seed,
                     prompts_per_step=prompts_per_step, hidden_size=hidden_size, num_layers=num_layers,
                     shift_logits=True, static_fraction=0.25, teacher_checkpoint=teacher_checkpoint,
                     response_field=response_field, block_grid=block_grid)


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


CONTINUATION_STEPS = 300
"""Steps of each larger-block stage of the tiny conversion (as many as the block-4 stage's)."""


@recipe(nodes=1, gpus_per_node=1, gpu="cpu")
def tiny_convert_4l_b8_tp1_pp1_1g() -> RunConfig:
    """The demo's conversion continued at block 8: run after ``tiny_convert_4l_tp1_pp1_1g`` (its run
    directory: the block-4 stage's last checkpoint is resumed) for 300 more steps."""
    cfg = conversion_config()
    return continued_at_block(cfg, name="tiny_convert_4l_b8_tp1_pp1_1g", block_size=8,
                              steps=cfg.train.steps + CONTINUATION_STEPS)


@recipe(nodes=1, gpus_per_node=1, gpu="cpu")
def tiny_convert_4l_b16_tp1_pp1_1g() -> RunConfig:
    """... then at block 16 (two blocks of the 32-token answers) for 300 more."""
    cfg = tiny_convert_4l_b8_tp1_pp1_1g()
    return continued_at_block(cfg, name="tiny_convert_4l_b16_tp1_pp1_1g", block_size=16,
                              steps=cfg.train.steps + CONTINUATION_STEPS)


@recipe(nodes=1, gpus_per_node=1, gpu="cpu")
def tiny_convert_4l_tp1_pp1_1g() -> RunConfig:
    """The demo's OPDLM conversion of that teacher: the settings measured to keep >= 95% of a tiny
    teacher's accuracy (``conversion_config`` says why each differs from the paper's).
    Convert your own tiny teacher with ``init.teacher_checkpoint=... data.path=... init.tokenizer=...``
    (and ``model.*`` for another shape)."""
    return conversion_config()
