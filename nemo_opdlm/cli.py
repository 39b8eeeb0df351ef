"""``opdlm``: the command line. ``opdlm train|demo|eval|plan ...``.

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
