"""``opdlm``: the command line. ``opdlm train|demo|eval|plan|smoke ...``.

One job: parse arguments and hand over to the module that does the work. Every subcommand that
takes a recipe accepts ``key=value`` overrides (``train.steps=10 rollout.threshold=0.8``), and the
config is validated before anything heavy starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("PYTHONWARNINGS", "ignore")


def _train(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="opdlm train", description="Run an OPDLM (or ablation) training job.")
    parser.add_argument("--recipe", required=True, help="recipes module:function, or a YAML config file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    from nemo_opdlm.config import dump_yaml, resolve

    cfg = resolve(args.recipe, list(args.overrides))
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    from nemo_opdlm.training.loop import train

    result = train(cfg)
    return 0 if result["status"] in ("completed", "preempted") else 1


def _smoke(argv: Sequence[str]) -> int:
    """A tiny CPU forward of the student (block mask) and the teacher (causal) on random weights."""
    import torch

    from nemo_opdlm.distill.teacher_targets import shifted_targets
    from nemo_opdlm.models import masks
    from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
    from nemo_opdlm.models.student import build_student, from_teacher
    from nemo_opdlm.models.teacher import build_teacher
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                      num_query_groups=2, vocab_size=128, qk_layernorm=True)
    with runtime(ParallelLayout()):
        teacher = build_teacher(cfg)
        student = build_student(cfg, DiffusionConfig(block_size=4, mask_token_id=127))
        from_teacher(student, teacher)
        valid = torch.ones(2, 8, dtype=torch.bool)
        layout = masks.build_layout(torch.tensor([5, 3]), 5, valid, 4, with_xt=True)
        ids = torch.randint(0, 127, (2, layout.meta.shape[-1]))
        with torch.no_grad():
            s_logits = student[0](ids, layout.position_ids, layout.meta)
            causal = masks.build_layout(torch.tensor([5, 3]), 5, valid, 1, with_xt=False)
            t_logits = teacher[0](ids[:, :13], causal.position_ids, causal.meta)
        targets = shifted_targets(t_logits, 5, 8, top_k=16)
        print(f"student logits {tuple(s_logits.shape)} (rows [prompt | x0 | xt], block 4), "
              f"teacher top-16 targets {tuple(targets.logprobs.shape)}: ok")
    return 0


def _delegate(module: str, function: str, argv: Sequence[str]) -> int:
    import importlib

    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        print(f"opdlm: this command is not available in this installation ({e})", file=sys.stderr)
        return 2
    return int(fn(list(argv)) or 0)


COMMANDS = {
    "train": ("run a training job (opdlm train --recipe RECIPE key=value ...)", _train),
    "demo": ("the embedded CPU demo: AR teacher -> OPDLM student -> evaluation",
             lambda a: _delegate("nemo_opdlm.demo", "demo_main", a)),
    "eval": ("generation-based evaluation", lambda a: _delegate("nemo_opdlm.eval.cli", "eval_main", a)),
    "plan": ("dry run + per-GPU memory plan of a recipe", lambda a: _delegate("nemo_opdlm.plan", "plan_main", a)),
    "smoke": ("tiny CPU forward of student and teacher", _smoke),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items())
        print(f"usage: opdlm COMMAND [args]\n\ncommands:\n{lines}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    from nemo_opdlm.errors import ConfigError, OPDLMError

    try:
        return COMMANDS[argv[0]][1](argv[1:])
    except OPDLMError as e:  # a problem the user can fix: one line, no traceback
        kind = "config error" if isinstance(e, ConfigError) else f"error ({type(e).__name__})"
        print(f"opdlm {argv[0]}: {kind}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
