"""Everything a run builds before its first step: tokenizer, teacher, student, prompts.

One job: turn a validated ``RunConfig`` into ready objects, failing early with errors that name
the config key (missing weights, tokenizer/vocab mismatches, an empty or too-small prompt set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from nemo_opdlm.checkpoint.format import check_checkpoint_config, load_dist_checkpoint
from nemo_opdlm.config import RunConfig
from nemo_opdlm.convert.hf_config import read_hf_config
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
    check_shared_vocab(len(tok), cfg, where)  # first: it names both sizes where they differ
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


def check_shared_vocab(tokenizer_len: int, cfg: RunConfig, where: str) -> None:
    """A teacher and student whose vocabularies differ in padding rows (``RunConfig.teacher_built``)
    must both cover every id of the tokenizer, else the rows dropped from the teacher are real ids."""
    t, s = cfg.teacher.vocab_size, cfg.model.vocab_size
    if t != s and tokenizer_len > min(t, s):
        raise ConfigError(
            f"teacher_model.vocab_size={t} and model.vocab_size={s} differ, and the tokenizer in {where} has "
            f"{tokenizer_len} ids: vocabularies may differ only in padding rows past the tokenizer; use a "
            "teacher and student of one family that share this tokenizer")


def eos_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS and end-of-turn tokens; a run whose responses could never end is refused."""
    ids = tokenizer_eos_ids(tokenizer)
    if not ids:
        raise ConfigError("the tokenizer has no EOS token: responses could never end")
    return ids


def _load_weights(chunks: list[DiffusionGPTModel], cfg_model, hf: Optional[str], ckpt: Optional[str],
                  global_groups: bool = True, checked_as=None) -> bool:
    """``hf`` or ``ckpt``'s weights into ``chunks`` (``global_groups`` False: a teacher at its own layout;
    ``checked_as``: the architecture the source is checked against when ``cfg_model`` cuts its
    vocabulary, ``RunConfig.teacher_built``)."""
    if hf:
        load_hf_weights(chunks, hf, cfg_model, checked_as=checked_as)
        return True
    if ckpt:
        if not os.path.isdir(ckpt):
            raise ConfigError(f"init.teacher_checkpoint: {ckpt} does not exist")
        load_dist_checkpoint(chunks, ckpt, cfg=cfg_model, global_groups=global_groups, checked_as=checked_as)
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
        teacher = build_teacher(cfg.teacher_built, teacher_parallel or parallel)
        _load_weights(teacher, cfg.teacher_built, cfg.init.teacher_hf, cfg.init.teacher_checkpoint,
                      global_groups=cfg.parallel.teacher is None, checked_as=cfg.teacher)
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


def check_data_cursor(loader: PromptLoader, ckpt_dir: str) -> None:
    """A resume from ``ckpt_dir`` can continue its data cursor with this run's prompts, seed and
    batch: checked once the prompts are read and before the models are built (the refusal used to
    come after both models had loaded, with config.yaml already rewritten)."""
    from nemo_opdlm.data.sampler import ShardedSampler
    from nemo_opdlm.errors import DataError
    from nemo_opdlm.training.checkpoint import saved_data_cursor

    saved = saved_data_cursor(ckpt_dir)
    if not saved or any(key not in saved for key in ShardedSampler.CURSOR_FIELDS):
        return  # unreadable or older: checkpoint.load names the problem
    differ = loader.sampler.mismatches(saved)
    if differ:
        keys = " and ".join(ShardedSampler.CURSOR_KEYS[k] for k in differ if k in ShardedSampler.CURSOR_KEYS)
        raise DataError(f"cannot resume the data cursor of {ckpt_dir} ({'; '.join(differ.values())}): set "
                        f"{keys or 'them'} back to resume it, or start a new run (another train.save_dir, or "
                        "train.resume=false train.overwrite=true)")


def build(cfg: RunConfig, parallel: ParallelContext, teacher_parallel: Optional[ParallelContext] = None,
          resume_from: Optional[str] = None) -> Setup:
    """Tokenizer and prompts first (cheap, most likely to be wrong), then, once a resume from
    ``resume_from`` is known to continue its data cursor, the models (the teacher at
    ``teacher_parallel``'s layout when it has its own)."""
    tokenizer = load_tokenizer(cfg)
    loader = build_loader(cfg, tokenizer, parallel)
    if resume_from:
        check_data_cursor(loader, resume_from)
    student, teacher = build_models(cfg, parallel, teacher_parallel)
    source = cfg.init.student_hf or (cfg.init.teacher_hf if cfg.teacher_model is None else None)
    return Setup(tokenizer, eos_ids(tokenizer), pad_id(tokenizer), student, teacher, loader, cfg.init.tokenizer_dir(),
                 read_hf_config(source) if source else None)
