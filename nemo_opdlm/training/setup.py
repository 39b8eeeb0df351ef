"""Everything a run builds before its first step: tokenizer, teacher, student, prompts.

One job: turn a validated ``RunConfig`` into ready objects, failing early with errors that name
the config key (missing weights, tokenizer/vocab mismatches, an empty or too-small prompt set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from nemo_opdlm.config import RunConfig
from nemo_opdlm.convert.hf_config import read_hf_config
from nemo_opdlm.convert.dist_checkpoint import check_checkpoint_config, load_dist_checkpoint
from nemo_opdlm.convert.hf_to_mcore import check_hf_config, load_hf_weights
from nemo_opdlm.data.prompts import check_mask_token, check_vocab_fits, load_prompts, pad_id
from nemo_opdlm.data.prompts import eos_ids as tokenizer_eos_ids
from nemo_opdlm.data.sampler import PromptLoader, ShardedSampler
from nemo_opdlm.distill.methods import get_method
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.gpt import DiffusionGPTModel
from nemo_opdlm.models.student import build_student, from_teacher
from nemo_opdlm.models.teacher import build_teacher, offload
from nemo_opdlm.runtime.context import ParallelContext


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    where = cfg.init.tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(where)
    check_vocab_fits(tok, cfg.model.vocab_size, where, "model.vocab_size")
    check_mask_token(cfg.diffusion.mask_token_id, tok, where)
    if cfg.init.student_hf and cfg.init.teacher_hf and cfg.init.student_hf != cfg.init.teacher_hf:
        other = AutoTokenizer.from_pretrained(cfg.init.student_hf)
        if other.get_vocab() != tok.get_vocab():
            raise ConfigError(
                f"init.student_hf ({cfg.init.student_hf}) and init.teacher_hf ({cfg.init.teacher_hf}) have "
                "different tokenizers: on-policy distillation needs one shared vocabulary"
            )
    return tok


def eos_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS and end-of-turn tokens; a run whose responses could never end is refused."""
    ids = tokenizer_eos_ids(tokenizer)
    if not ids:
        raise ConfigError("the tokenizer has no EOS token: responses could never end")
    return ids


def _load_weights(chunks: list[DiffusionGPTModel], cfg_model, hf: Optional[str], ckpt: Optional[str],
                  global_groups: bool = True) -> bool:
    """``hf`` or ``ckpt``'s weights into ``chunks`` (``global_groups`` False: a teacher at its own layout)."""
    if hf:
        load_hf_weights(chunks, hf, cfg_model)
        return True
    if ckpt:
        if not os.path.isdir(ckpt):
            raise ConfigError(f"init.teacher_checkpoint: {ckpt} does not exist")
        load_dist_checkpoint(chunks, ckpt, cfg=cfg_model, global_groups=global_groups)
        return True
    return False


def check_weights(cfg: RunConfig) -> None:
    """Each weights source of ``init`` describes the architecture the run builds for it, checked from
    its config.json / opdlm_convert.json before any model is built; a mismatch names the run's
    fields (``model.num_layers=2 vs num_hidden_layers=4``), where loading the tensors would only
    have found unknown or missing ones."""
    needs_teacher = get_method(cfg.distill.method).needs_teacher
    loaded = cfg.teacher if needs_teacher else cfg.model  # what init.teacher_* is loaded into
    field = "teacher_model." if needs_teacher and cfg.teacher_model is not None else "model."
    if cfg.init.teacher_hf:
        check_hf_config(cfg.init.teacher_hf, loaded, field)
    if cfg.init.teacher_checkpoint and os.path.isdir(cfg.init.teacher_checkpoint):
        check_checkpoint_config(cfg.init.teacher_checkpoint, loaded, field)
    if cfg.init.student_hf:
        check_hf_config(cfg.init.student_hf, cfg.model, "model.")


def build_models(cfg: RunConfig, parallel: ParallelContext, teacher_parallel: Optional[ParallelContext] = None
                 ) -> tuple[list[DiffusionGPTModel], Optional[list[DiffusionGPTModel]]]:
    """(student, teacher or None), weights loaded as ``init`` says: the student at ``parallel``'s
    layout, the teacher at ``teacher_parallel``'s (``parallel.teacher``; None: the student's)."""
    check_weights(cfg)
    teacher = None
    if get_method(cfg.distill.method).needs_teacher:
        if not (cfg.init.teacher_hf or cfg.init.teacher_checkpoint):
            raise ConfigError(f"distill.method={cfg.distill.method} needs the teacher's weights: "
                              "set init.teacher_hf or init.teacher_checkpoint")
        teacher = build_teacher(cfg.teacher, teacher_parallel or parallel)
        _load_weights(teacher, cfg.teacher, cfg.init.teacher_hf, cfg.init.teacher_checkpoint,
                      global_groups=cfg.parallel.teacher is None)
        if cfg.distill.teacher_offload and torch.cuda.is_available():
            offload(teacher, "cpu")  # brought to the GPU only while a step uses it
    student = build_student(cfg.model, cfg.diffusion, parallel)
    if cfg.init.student_hf:
        load_hf_weights(student, cfg.init.student_hf, cfg.model)
    elif teacher is not None and cfg.teacher_model is None and cfg.parallel.teacher is None:
        from_teacher(student, teacher)  # self-distillation: the student starts as the teacher
    elif teacher is not None and cfg.teacher_model is None:  # the same weights, read at the student's layout
        _load_weights(student, cfg.model, cfg.init.teacher_hf, cfg.init.teacher_checkpoint)
    elif teacher is not None:
        raise ConfigError("a teacher_model different from the student needs init.student_hf for the student")
    else:
        _load_weights(student, cfg.model, cfg.init.teacher_hf, cfg.init.teacher_checkpoint)
    return student, teacher


def build_loader(cfg: RunConfig, tokenizer, parallel: ParallelContext) -> PromptLoader:
    """This data-parallel rank's prompts: disjoint slices of each global batch."""
    if cfg.data is None:
        raise ConfigError("data.path is not set: give a JSONL/Parquet prompt file or a saved dataset")
    dp = parallel.dp_size
    if cfg.train.prompts_per_step % (dp * cfg.train.micro_batch_size):
        raise ConfigError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} must be a multiple of data-parallel size "
            f"({dp}) x train.micro_batch_size ({cfg.train.micro_batch_size})"
        )
    prompts = load_prompts(cfg.data, tokenizer, tokenizer.eos_token_id)
    sampler = ShardedSampler(
        len(prompts), global_batch_size=cfg.train.prompts_per_step, dp_rank=parallel.dp_rank,
        dp_size=dp, seed=cfg.train.seed,
    )
    return PromptLoader(prompts, sampler, pad_id(tokenizer))


@dataclass
class Setup:
    tokenizer: object
    eos_ids: tuple[int, ...]
    pad_id: int
    student: list[DiffusionGPTModel]
    teacher: Optional[list[DiffusionGPTModel]]
    loader: PromptLoader
    tokenizer_dir: str
    """Where the tokenizer files are (every checkpoint carries a copy)."""
    hf_config: Optional[dict]
    """The student's HF config.json (``init.student_hf``, else ``init.teacher_hf``) when the run read
    one: checkpoints record it, so that the HF export needs no ``--hf-source``."""


def build(cfg: RunConfig, parallel: ParallelContext, teacher_parallel: Optional[ParallelContext] = None) -> Setup:
    """Tokenizer and prompts first (cheap, most likely to be wrong), then the models (the teacher at
    ``teacher_parallel``'s layout when it has its own)."""
    tokenizer = load_tokenizer(cfg)
    loader = build_loader(cfg, tokenizer, parallel)
    student, teacher = build_models(cfg, parallel, teacher_parallel)
    source = cfg.init.student_hf or (cfg.init.teacher_hf if cfg.teacher_model is None else None)
    return Setup(tokenizer, eos_ids(tokenizer), pad_id(tokenizer), student, teacher, loader, cfg.init.tokenizer_dir(),
                 read_hf_config(source) if source else None)
