"""Import a Hugging Face checkpoint (Qwen3 / Qwen2 / Llama 3.x) as a megatron-core torch_dist checkpoint.

Thin CLI over ``nemo_opdlm.convert``. Runs on one process or under torchrun for a TP/PP layout
(the checkpoint loads at any layout either way; a parallel import only spreads the work)::

    python tools/import_hf.py --hf-dir Qwen3-0.6B --out ckpt/qwen3-0.6b
    torchrun --nproc_per_node=4 tools/import_hf.py --hf-dir Qwen3-8B --out ckpt/q8b --tp 2 --pp 2

Everything that can be refused (unsupported architecture, missing/corrupt shard, vocabulary
mismatch, existing target, a layout that does not divide the model) is refused before the
parallel runtime starts, and nothing is left behind; an import killed half-way leaves a hidden
staging directory beside --out, which the next import to that --out removes.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this job")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this job")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this (default: ModelConfig's)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from nemo_opdlm.convert import hf_config as hfc
    from nemo_opdlm.convert.errors import ConvertError
    from nemo_opdlm.convert.hf_to_mcore import HFCheckpoint, import_hf
    from nemo_opdlm.checkpoint.format import DIST_CHECKPOINT
    from nemo_opdlm.checkpoint.staging import check_target
    from nemo_opdlm.runtime.comm import is_rank0
    from nemo_opdlm.errors import ConfigError
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    overrides = {}
    if args.dtype:
        overrides["params_dtype"] = args.dtype
    if args.make_vocab_size_divisible_by:
        overrides["make_vocab_size_divisible_by"] = args.make_vocab_size_divisible_by
    try:
        cfg = hfc.model_config_from_hf(hfc.read_hf_config(args.hf_dir), **overrides)
        layout = ParallelLayout(tp=args.tp, pp=args.pp, vpp=args.vpp)
        layout.check_model(cfg, where="")  # the --tp/--pp flags
        hfc.check_tokenizer_fits(args.hf_dir, cfg.vocab_size)
        check_target(args.out, args.overwrite, DIST_CHECKPOINT)
        HFCheckpoint(args.hf_dir).check_matches(cfg)
    except (ConvertError, ConfigError) as err:
        print(f"import_hf: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with runtime(layout, models=(("model", cfg),)) as rt:
        import_hf(args.hf_dir, args.out, rt.ctx, overwrite=args.overwrite, **overrides)
        if is_rank0():
            print(f"import_hf: {cfg.family} ({cfg.num_layers} layers, vocab {cfg.vocab_size}, {cfg.params_dtype}) "
                  f"-> {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    from nemo_opdlm.errors import guarded

    sys.exit(guarded("import_hf", main))
