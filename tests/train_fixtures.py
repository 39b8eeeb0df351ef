"""A tiny but complete training setup on disk (HF teacher, tokenizer, prompt file, RunConfig) and
what the trainer's end-to-end tests share: the subprocess environment, the CLI command, losses."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

from nemo_opdlm.config import (
    DiffusionConfig,
    DistillConfig,
    OptimConfig,
    PromptDataConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
    InitConfig,
    from_dict,
    apply_overrides,
    to_dict,
)
from nemo_opdlm.convert.hf_config import model_config_from_hf, read_hf_config
from tests.convert_models import save_hf


def write_prompts(path: str, n: int = 16, seed: int = 0, with_responses: bool = True) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(f"w{rng.randint(10, 60)}" for _ in range(rng.randint(2, 6)))
            record = {"prompt": prompt}
            if with_responses:
                record["response"] = " ".join(f"w{rng.randint(10, 60)}" for _ in range(rng.randint(3, 9)))
            f.write(json.dumps(record) + "\n")


def _publish(path: str, write) -> None:
    """Write ``path`` through a private temporary name and rename it into place, so that ranks
    calling ``make_run`` on the same directory at once never read a half-written file (a rank
    once read an empty config.json another rank was still writing). The first rename wins; the
    others' identical copies are dropped."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another rank's copy is already in place
        shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)


def make_run(tmp_dir: str, *overrides: str) -> RunConfig:
    """A 3-step OPDLM run on a tiny Qwen3 teacher (self-distillation), 4 prompts per step."""
    hf_dir = os.path.join(tmp_dir, "teacher_hf")
    if not os.path.isdir(hf_dir):
        _publish(hf_dir, lambda tmp: save_hf("qwen3", tmp, seed=0))
    prompts = os.path.join(tmp_dir, "prompts.jsonl")
    if not os.path.exists(prompts):
        _publish(prompts, write_prompts)
    model = model_config_from_hf(read_hf_config(hf_dir), attention_backend="sdpa", max_position_embeddings=256)
    cfg = RunConfig(
        name="tiny",
        model=model,
        diffusion=DiffusionConfig(block_size=4, mask_token_id=99),
        init=InitConfig(teacher_hf=hf_dir),
        data=PromptDataConfig(path=prompts, response_field="response", max_prompt_tokens=16, chat_template="never"),
        rollout=RolloutConfig(min_length=8, max_length=16, curriculum_steps=2, temperature=1.0),
        distill=DistillConfig(method="opdlm"),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1),
        train=TrainConfig(steps=3, prompts_per_step=4, micro_batch_size=2, save_dir=os.path.join(tmp_dir, "run")),
    )
    if overrides:
        cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), list(overrides)))
    return cfg


ENV = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), OMP_NUM_THREADS="1",
           PYTHONWARNINGS="ignore")
"""The environment of a trainer subprocess: this checkout importable, one thread, no warnings."""


def cli_cmd(cfg_path: str, *extra: str) -> list[str]:
    """``opdlm train --recipe CFG ...`` as a subprocess command."""
    return [sys.executable, "-m", "nemo_opdlm.cli", "train", "--recipe", cfg_path, *extra]


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history]


def read_metrics(run_dir: str) -> dict[int, float]:
    """step -> loss from a run's ``metrics.jsonl`` (a resumed run's lines replace the killed run's)."""
    by_step = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row["loss"]
    return by_step
