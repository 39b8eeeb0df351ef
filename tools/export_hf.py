"""Export a megatron-core torch_dist checkpoint (saved at any TP/PP) as a Hugging Face directory.

Thin CLI over ``nemo_opdlm.convert``. A block-diffusion student (``--mask-token-id``, or diffusion
settings stored in the checkpoint) becomes a ``trust_remote_code`` model with the source
architecture's tensor names; ``--teacher`` (or a checkpoint without diffusion settings) restores
the original architecture exactly::

    python tools/export_hf.py --ckpt runs/student/step_0000300 --out hf/student --threshold 0.9 \
        --eval-results runs/student/eval.json
    python tools/export_hf.py --ckpt ckpt/student --out hf/student --mask-token-id 151669 --block-size 4
    torchrun --nproc_per_node=2 tools/export_hf.py --ckpt ckpt/q8b --out hf/q8b --teacher --tp 2
    python tools/export_hf.py --ckpt runs/student/step_0000300 --out hf/student-sdar --format sdar --threshold 0.9

Trainer checkpoints (``step_N``) and imports carry the source config.json and tokenizer, so
``--hf-source`` is needed only for checkpoints written by other code (and ``--prefix`` if their
model keys are nested). A student gets its tokenizer with the [MASK] registered as its mask token,
a generation_config.json for its block decoder (``--steps-per-block``, ``--threshold``) and a
model card (README.md) with the scores of ``--eval-results`` files.

``--format sdar`` writes the SDAR layout that SGLang, lmdeploy and JetEngine serve
(``nemo_opdlm/convert/sdar.py``, ``docs/serving.md``): a Qwen3 student with [MASK] 151669, unshifted
logits, trained on the absolute block grid; anything else is refused before anything is written.
A trainer checkpoint records its block grid (``diffusion.block_grid``; one saved before the
setting existed reads as 'response', and says so); ``--block-grid`` gives it for a checkpoint
without diffusion settings, and is refused where it contradicts the record.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Optional


def parse_size(text: str) -> int:
    """'5GB', '500MB', '20KB' or a byte count -> bytes (powers of 1000 as in transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse size {text!r} (e.g. 5GB, 500MB)")
    scale = {"": 1, "B": 1, "KB": 10**3, "K": 10**3, "MB": 10**6, "M": 10**6, "GB": 10**9, "G": 10**9}[m.group(2)]
    return int(float(m.group(1)) * scale)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="megatron-core torch_dist checkpoint directory")
    p.add_argument("--out", required=True, help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--hf-source", default=None, help="HF directory of the base model (config + tokenizer)")
    p.add_argument("--teacher", action="store_true", help="export the unchanged AR architecture")
    p.add_argument("--mask-token-id", type=int, default=None, help="student: the [MASK] token id")
    p.add_argument("--block-size", type=int, default=4, help="student: tokens per diffusion block")
    p.add_argument("--shift-logits", action="store_true",
                   help="student: it predicts token i at position i - 1 (diffusion.shift_logits; a trainer "
                        "checkpoint records this itself)")
    p.add_argument("--block-grid", choices=("response", "absolute"), default=None,
                   help="student: the block grid it was trained on (diffusion.block_grid), for a checkpoint without "
                        "diffusion settings (default 'response'); a trainer checkpoint records it, and another grid "
                        "is refused")
    p.add_argument("--format", dest="export_format", choices=("opdlm", "sdar"), default="opdlm",
                   help="opdlm: this project's layout (transformers, trust_remote_code); sdar: the layout SGLang, "
                        "lmdeploy and JetEngine serve (Qwen3, [MASK] 151669, absolute block grid)")
    p.add_argument("--allow-grid-mismatch", action="store_true",
                   help="--format sdar: export a student trained on the response grid anyway (the engines decode on "
                        "the absolute grid); the model card then warns")
    p.add_argument("--prefix", default="", help="sharded-key prefix of the model inside the checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this job")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this job")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the exported weights (default: as stored); config.json records it")
    p.add_argument("--steps-per-block", type=int, default=None,
                   help="student: default rounds per block in generation_config.json (default: the block size)")
    p.add_argument("--threshold", type=float, default=None,
                   help="student: default confidence threshold in generation_config.json (default: static decoding)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="student: default generation length")
    p.add_argument("--eval-results", action="append", default=[], metavar="FILE",
                   help="student: an opdlm eval --output JSON whose scores go into the model card (repeatable)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), help="per safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def trained_grid(recorded: Optional[dict], block_grid: Optional[str], ckpt: str) -> str:
    """The block grid of the checkpoint's student. A checkpoint with diffusion settings records it
    (``models.grid.recorded_grid``: settings saved before ``diffusion.block_grid`` existed read as
    'response', the only grid then, and a line says so), and ``--block-grid`` may repeat it but not
    contradict it; a checkpoint without diffusion settings (an import, other code's) takes
    ``--block-grid``, else 'response'."""
    from nemo_opdlm.errors import ConfigError
    from nemo_opdlm.models.grid import recorded_grid

    saved, note = recorded_grid(recorded, ckpt)
    if note:
        print(f"export_hf: {note}")
    if saved is not None and block_grid is not None and block_grid != saved:
        raise ConfigError(f"--block-grid {block_grid} names another grid than the one {ckpt} was trained on "
                          f"(diffusion.block_grid={saved}): drop --block-grid, or export the checkpoint trained on "
                          f"the {block_grid!r} grid")
    return block_grid or saved or "response"


def default_decoding(threshold: Optional[float], steps_per_block: Optional[int]):
    """``--threshold`` / ``--steps-per-block`` as the one decoding schema (``rollout.decode.DecodeConfig``):
    static without a threshold, else dynamic; its range checks name these flags."""
    from nemo_opdlm.errors import ConfigError
    from nemo_opdlm.rollout.decode import DecodeConfig

    mode = {"mode": "static"} if threshold is None else {"mode": "dynamic", "threshold": threshold}
    try:
        return DecodeConfig(steps_per_block=steps_per_block, **mode)
    except ConfigError as err:
        raise ConfigError(f"--threshold / --steps-per-block: {err}") from None


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import torch

    from nemo_opdlm.convert.export_assets import (MASK_TOKEN, load_tokenizer, read_eval_results,
                                                  register_mask_token)
    from nemo_opdlm.convert.mcore_to_hf import HF_EXPORT, check_export_format, export_checkpoint, resolve_export
    from nemo_opdlm.convert.sdar import SDAR_MASK_TOKEN
    from nemo_opdlm.checkpoint.format import read_checkpoint_meta
    from nemo_opdlm.checkpoint.staging import check_target
    from nemo_opdlm.runtime.comm import is_rank0
    from nemo_opdlm.errors import OPDLMError
    from nemo_opdlm.models.config import DiffusionConfig, check_mask_in_vocab
    from nemo_opdlm.rollout.schedules import BlockSchedule
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    try:  # everything that can be refused is refused before the runtime starts, and nothing is written
        check_target(args.out, args.overwrite, HF_EXPORT)
        meta = read_checkpoint_meta(args.ckpt) or {}
        cfg, _, assets_dir = resolve_export(args.ckpt, hf_source=args.hf_source)
        layout = ParallelLayout(tp=args.tp, pp=args.pp)
        layout.check_model(cfg, where="")  # the --tp/--pp flags
        diffusion = None
        if args.mask_token_id is not None and not args.teacher:
            check_mask_in_vocab(args.mask_token_id, cfg.vocab_size, "--mask-token-id")
            diffusion = DiffusionConfig(block_size=args.block_size, mask_token_id=args.mask_token_id,
                                        shift_logits=args.shift_logits,
                                        block_grid=trained_grid(meta.get("diffusion"), args.block_grid, args.ckpt))
        elif meta.get("diffusion") and not args.teacher:
            grid = trained_grid(meta["diffusion"], args.block_grid, args.ckpt)
            diffusion = DiffusionConfig(**dict(meta["diffusion"], block_grid=grid))
        check_export_format(cfg, diffusion, args.export_format, args.allow_grid_mismatch)
        decoding = default_decoding(args.threshold, args.steps_per_block)
        if diffusion is not None:
            BlockSchedule.of(diffusion, decoding)  # --steps-per-block fits the block
        tokenizer = load_tokenizer(assets_dir) if diffusion is not None else None
        if tokenizer is not None:  # an ordinary word as [MASK] is refused here, before anything is written
            source = "--mask-token-id" if args.mask_token_id is not None else f"{args.ckpt}'s diffusion.mask_token_id"
            register_mask_token(tokenizer, diffusion.mask_token_id, source,
                                token=SDAR_MASK_TOKEN if args.export_format == "sdar" else MASK_TOKEN)
        eval_results = read_eval_results(args.eval_results)
    except OPDLMError as err:
        print(f"export_hf: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with runtime(layout) as rt:
        cfg = export_checkpoint(args.ckpt, args.out, rt.ctx, diffusion=diffusion, as_teacher=args.teacher,
                                hf_source=args.hf_source, prefix=args.prefix, overwrite=args.overwrite,
                                max_shard_bytes=args.max_shard_size, dtype=dtype, decoding=decoding,
                                max_new_tokens=args.max_new_tokens,
                                eval_results=eval_results, export_format=args.export_format,
                                allow_grid_mismatch=args.allow_grid_mismatch)
        if is_rank0():
            kind = "teacher" if args.teacher or (diffusion is None and not meta.get("diffusion")) else "student"
            layout = f" ({args.export_format} format)" if kind == "student" else ""
            print(f"export_hf: {cfg.family} {kind}{layout} -> {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    from nemo_opdlm.errors import guarded

    sys.exit(guarded("export_hf", main))
