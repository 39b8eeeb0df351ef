"""Loading a model for decoding: an HF directory of an AR model, or a megatron-core checkpoint.

One job: build this rank's model chunks for the running runtime's layout, load their weights, and
say what decoding needs to know about them (tokenizer, [MASK] id, block size, ``shift_logits``, grid),
from the checkpoint's metadata or the caller's arguments. Used by ``opdlm eval``, the lm-eval
adapter, the demo and the benchmarks. Non-goals: decoding and scoring (``evaluate.py``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

from nemo_opdlm.errors import CheckpointError, ConfigError, OPDLMError
from nemo_opdlm.models.config import DiffusionConfig, check_mask_in_vocab, decoding_diffusion
from nemo_opdlm.models.grid import GRIDS, resolve_grid
from nemo_opdlm.runtime.context import ParallelContext


@dataclass
class LoadedModel:
    """Model chunks for this rank plus what decoding needs to know about them."""

    chunks: list
    tokenizer: Any
    model_config: Any
    mask_token_id: Optional[int]
    block_size: Optional[int]
    shift_logits: bool = False
    """The student predicts token i at position i - 1 (``DiffusionConfig.shift_logits``)."""
    block_grid: Optional[str] = None
    """Where its blocks fall (``DiffusionConfig.block_grid``); None: nothing recorded or asked (the
    default grid)."""
    note: Optional[str] = None
    """A line for the user about how the model's records were read (e.g. a checkpoint older than
    ``diffusion.block_grid``), or None."""

    @property
    def diffusion(self) -> Optional[DiffusionConfig]:
        """The model read as a block-diffusion student (its checkpoint's block size and grid, else the
        defaults), or None when no [MASK] id is known (an AR model: AR decoding only)."""
        return decoding_diffusion(self.mask_token_id, self.shift_logits, self.block_size, self.block_grid)


def start_single_runtime(tp: int = 1, pp: int = 1, seed: int = 1234) -> ParallelContext:
    """This process's parallel context, starting the runtime if it is not running (the lm-eval
    adapter loads models inside lm-eval's own process)."""
    from nemo_opdlm.runtime.distributed import ParallelLayout, current_runtime, init_runtime

    rt = current_runtime() or init_runtime(ParallelLayout(tp=tp, pp=pp), seed=seed)
    return rt.ctx


def has_tokenizer(directory: str) -> bool:
    """``directory`` holds tokenizer files (a checkpoint's ``hf_assets/`` may hold only config.json)."""
    from nemo_opdlm.convert.hf_config import has_tokenizer_files

    return has_tokenizer_files(directory)


def tokenizer_dir(tokenizer: Optional[str], hf: Optional[str], ckpt: Optional[str], how: str = "--tokenizer DIR") -> str:
    """Where the tokenizer is read from: ``tokenizer``, else the HF directory, else the checkpoint's
    ``hf_assets/`` (trainer checkpoints and imports carry it) or ``tokenizer/``. ``how`` names the
    argument that gives one, for the error when none is found."""
    if tokenizer:
        return tokenizer
    if hf:
        return hf
    for sub in ("hf_assets", "tokenizer"):
        path = os.path.join(ckpt or "", sub)
        if os.path.isdir(path) and has_tokenizer(path):
            return path
    raise ConfigError(f"no tokenizer found for {ckpt} (no tokenizer files in its hf_assets/ or tokenizer/): give the "
                      f"tokenizer directory ({how})")


@dataclass(frozen=True)
class StudentRecord:
    """What a model's own files say about it being a block-diffusion student (read before it is built)."""

    shift_logits: bool
    """It predicts token i at position i - 1 (``diffusion.shift_logits``)."""
    source: str
    """The file that says so, with what it says."""


def student_record(hf: Optional[str], ckpt: Optional[str]) -> Optional[StudentRecord]:
    """The record of a block-diffusion student: an exported student's config.json, or a training
    checkpoint's config.yaml whose ``distill.method`` is not causal. None for an AR model and for
    a model whose files do not say (an import, or a checkpoint older than config.yaml); unreadable
    files are left to ``load_model``, which names them."""
    from nemo_opdlm.convert import hf_config as hfc

    try:
        if hf and not ckpt and os.path.isfile(os.path.join(hf, "config.json")):
            cfg = hfc.read_hf_config(hf)
            if hfc.is_student_config(cfg):
                shift = bool(cfg.get("shift_logits", False))
                return StudentRecord(shift, f"{hf}/config.json: an exported student, shift_logits={shift}")
        if ckpt and not hf and os.path.isfile(os.path.join(ckpt, "metadata.json")):
            from nemo_opdlm.distill.methods import get_method
            from nemo_opdlm.training.run_config import read

            saved = read(ckpt) or {}
            method = (saved.get("distill") or {}).get("method")
            if method and not get_method(method).causal:
                shift = bool((saved.get("diffusion") or {}).get("shift_logits", False))
                return StudentRecord(shift, f"{ckpt}/config.yaml: distill.method={method}, "
                                            f"diffusion.shift_logits={str(shift).lower()}")
    except (OPDLMError, OSError, ValueError, TypeError, AttributeError):
        return None
    return None


def causal_decoding_note(hf: Optional[str], ckpt: Optional[str]) -> Optional[str]:
    """Whether ``--modes ar`` means anything for this model, decided from its files before it is
    built: an unshifted block-diffusion student predicts each masked token at its own position, so
    causal decoding would read its logits as next-token ones and report a meaningless score (the
    exported model refuses the same for log-likelihoods): refused. A shifted student's logits do
    predict the next token: allowed, with the note returned to print. None: an AR model."""
    record = student_record(hf, ckpt)
    if record is None:
        return None
    model = hf or ckpt
    if not record.shift_logits:
        raise ConfigError(
            f"--modes ar: {model} is a block-diffusion student ({record.source}) that predicts each masked token at "
            "its own position, so causal decoding would read its logits as next-token ones and score nothing "
            "meaningful: score it with --modes static dynamic, and its AR teacher with --modes ar")
    return (f"note: --modes ar decodes {model}, a block-diffusion student with shifted logits ({record.source}), "
            "causally, one token per forward from the next-token logits: it measures the student as a left-to-right "
            "model, not its block decoding (static, dynamic)")


def check_checkpoint_dir(ckpt: str) -> None:
    """``ckpt`` is a megatron-core checkpoint; a training run's directory is answered with the
    ``step_N`` checkpoints in it (the one ``latest`` names first), not with a missing metadata file."""
    from nemo_opdlm.checkpoint.run_dir import step_dirs

    if not os.path.isdir(ckpt):
        raise CheckpointError(f"--ckpt {ckpt} " + ("is a file, not a checkpoint directory" if os.path.exists(ckpt)
                                                   else "does not exist"))
    if os.path.isfile(os.path.join(ckpt, "metadata.json")):
        return
    steps = [os.path.basename(path) for _, path in step_dirs(ckpt)]
    if steps:
        pointer, latest = os.path.join(ckpt, "latest"), steps[-1]
        if os.path.isfile(pointer):
            with open(pointer) as f:
                named = f.read().strip()
            latest = named if named in steps else latest
        shown = ", ".join(steps[-4:]) + (f" and {len(steps) - 4} earlier" if len(steps) > 4 else "")
        raise CheckpointError(f"--ckpt {ckpt} is a training run directory, not a checkpoint: use "
                              f"{os.path.join(ckpt, latest)} (its checkpoints: {shown})")
    raise CheckpointError(f"--ckpt {ckpt} is not a megatron-core checkpoint (no metadata.json): give a checkpoint "
                          "directory (tools/import_hf.py output, or a training run's step_N)")


def load_model(parallel: ParallelContext, *, hf: Optional[str] = None, ckpt: Optional[str] = None,
               tokenizer: Optional[str] = None, prefix: str = "", mask_token_id: Optional[int] = None,
               block_size: Optional[int] = None, shift_logits: Optional[bool] = None,
               block_grid: Optional[str] = None, allow_grid_mismatch: bool = False,
               model_config: Any = None, tokenizer_arg: str = "--tokenizer DIR") -> LoadedModel:
    """Load weights for ``parallel``'s layout (the running runtime's ``Runtime.ctx``).

    ``hf``: an HF directory of a supported AR model (Qwen3 / Qwen2 / Llama) or of a student exported
    by ``tools/export_hf.py`` (its diffusion settings read from its config.json). ``ckpt``: a torch_dist
    checkpoint; its ModelConfig comes from the converter's metadata (``opdlm_convert.json``) or
    from ``model_config`` (e.g. the training run's config). The [MASK] id and block size come from
    the arguments, else the checkpoint's diffusion metadata, else the tokenizer's mask token;
    ``shift_logits`` from the argument, else the metadata, else False; ``block_grid`` from the
    metadata (a different one from the argument is refused unless ``allow_grid_mismatch``:
    ``models.grid.resolve_grid``), else the argument. The tokenizer and the [MASK]
    id are checked against the model's vocabulary before the model is built. ``tokenizer_arg`` names
    the caller's argument for a tokenizer directory in the error raised when none is found.
    """
    from transformers import AutoTokenizer

    from nemo_opdlm.checkpoint.format import load_dist_checkpoint, read_checkpoint_meta
    from nemo_opdlm.convert import hf_config as hfc
    from nemo_opdlm.convert.hf_to_mcore import teacher_from_hf
    from nemo_opdlm.data.prompts import check_vocab_fits
    from nemo_opdlm.models.describe import model_config_from_dict
    from nemo_opdlm.models.student import build_chunks

    if bool(hf) == bool(ckpt):
        raise ConfigError("give exactly one model: an HF directory (hf, --hf) or a checkpoint (ckpt, --ckpt)")
    if ckpt:
        check_checkpoint_dir(ckpt)
    if block_grid is not None and block_grid not in GRIDS:  # before anything is read
        raise ConfigError(f"--block-grid must be one of {GRIDS}, got {block_grid!r}")
    tok_dir = tokenizer_dir(tokenizer, hf, ckpt, tokenizer_arg)
    diffusion: dict = {}
    hf_cfg: Optional[dict] = None
    if hf:
        hf_cfg = hfc.read_hf_config(hf)
        cfg = hfc.model_config_from_hf(hf_cfg)
        if hfc.is_student_config(hf_cfg):
            diffusion = dataclasses.asdict(hfc.student_diffusion(hf_cfg))
            if "block_grid" not in hf_cfg:  # exported before the setting existed: recorded_grid says so
                del diffusion["block_grid"]
    else:
        meta = read_checkpoint_meta(ckpt) or {}
        diffusion = meta.get("diffusion") or {}
        cfg = model_config
        if cfg is None and meta.get("model_config"):
            cfg = model_config_from_dict(meta["model_config"])
        if cfg is None:
            raise CheckpointError(f"{ckpt} has no opdlm_convert.json: its model config is unknown "
                                  "(evaluate through the training run, or use tools/import_hf.py)")
    # an exported student's config.json names remote code: the tokenizer does not need it
    tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=hf_cfg is not None and hfc.is_student_config(hf_cfg))
    check_vocab_fits(tok, cfg.vocab_size, tok_dir, f"the vocab_size of {hf or ckpt}")
    if mask_token_id is not None:
        mask, source = mask_token_id, "--mask-token-id"
    elif diffusion.get("mask_token_id") is not None:
        mask, source = diffusion["mask_token_id"], f"{hf or ckpt}'s diffusion settings"
    else:
        mask, source = tok.mask_token_id, f"the tokenizer in {tok_dir}"
    if mask is not None:
        check_mask_in_vocab(mask, cfg.vocab_size, f"from {source}")
    grid, note = resolve_grid(diffusion, block_grid, hf or ckpt, allow_mismatch=allow_grid_mismatch)
    if hf:
        cfg, chunks = teacher_from_hf(hf, parallel)
    else:
        chunks = build_chunks(cfg, parallel)
        load_dist_checkpoint(chunks, ckpt, prefix=prefix, cfg=cfg)
    for c in chunks:
        c.eval()
    shift = bool(diffusion.get("shift_logits", False)) if shift_logits is None else shift_logits
    return LoadedModel(chunks, tok, cfg, mask, block_size or diffusion.get("block_size"), shift, grid, note)
