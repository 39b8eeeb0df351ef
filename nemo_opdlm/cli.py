"""``opdlm``: the command line. ``opdlm train|demo|eval|plan|lm-eval ...``.

One job: parse arguments and hand over to the module that does the work. Every subcommand that
takes a recipe accepts ``key=value`` overrides (``train.steps=10 rollout.threshold=0.8``), and the
config is validated before anything heavy starts.

A problem the user can fix (any :class:`~nemo_opdlm.errors.OPDLMError`, and an ``OSError`` such as
an unwritable directory, a full disk or a read-only filesystem) is printed as one line naming it
and the remedy, exit status 2, on every rank that meets it (prefixed with the rank in a multi-rank
job), without a traceback; ``opdlm --debug ...`` or ``OPDLM_DEBUG=1`` shows the traceback instead.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Optional, Sequence

from nemo_opdlm.errors import DEBUG_ENV, debugging, error_line, guarded  # noqa: F401  (their old home)
from nemo_opdlm.runtime.known_warnings import filter_known_warnings

filter_known_warnings()  # megatron-core's 'Transformer Engine and Apex are not installed' and kin, in-process


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The config arguments ``opdlm train`` and ``opdlm plan`` share: a recipe, partial YAML overlays
    on top of it, then ``key=value`` overrides (``${...}`` interpolations resolve against the result)."""
    parser.add_argument("--recipe", default=None,
                        help="a recipe (module:function or its bare name: `opdlm recipes` lists them), or a "
                             "whole YAML config file")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="a partial YAML config merged on top of the recipe (repeatable, in order); without "
                             "--recipe the first is the whole config, e.g. recipes/qwen3_8b_self_tp2_pp1_8g.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides, applied last, e.g. train.steps=10 train.save_dir=runs/${name}")


def _train(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="opdlm train", description="Run an OPDLM (or ablation) training job.")
    add_config_args(parser)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_intermixed_args(argv)
    from nemo_opdlm.config import dump_yaml
    from nemo_opdlm.recipes.lookup import resolve

    cfg = resolve(args.recipe, list(args.overrides), args.config)
    if args.print_config:
        print(dump_yaml(cfg))
        return 0
    from nemo_opdlm.training.loop import train

    result = train(cfg)
    return 0 if result["status"] in ("completed", "preempted", "exited") else 1


def _recipes(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="opdlm recipes", description="List the installed recipes: what "
                                     "--recipe takes, the cluster each is sized for, and what it runs.")
    parser.add_argument("--export", metavar="DIR", default=None,
                        help="write each as DIR/NAME.yaml (what `opdlm train --recipe NAME --print-config` gives, "
                             "the cluster in a header comment); the repository's recipes/ is written this way")
    args = parser.parse_args(argv)
    if args.export is not None:
        from nemo_opdlm.recipes.export import export

        written, removed = export(args.export)
        gone = f"; removed {len(removed)} whose recipe is gone: {', '.join(removed)}" if removed else ""
        print(f"wrote {len(written)} recipes to {args.export}{gone}")
        return 0
    from nemo_opdlm.recipes.lookup import table

    rows = table()
    width = max(len(r.spec) for r in rows)
    for r in rows:
        print(f"{r.spec:<{width}}  {r.cluster:<16}  {r.summary}")
    print(f"\n{len(rows)} recipes; use one with `opdlm train --recipe NAME key=value ...` "
          "(the bare function name works too); `opdlm plan NAME` checks it first")
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
    "plan": ("dry run + per-GPU memory plan of a recipe", lambda a: _delegate("nemo_opdlm.plan.cli", "plan_main", a)),
    "recipes": ("list the installed recipes", _recipes),
    "lm-eval": ("lm-evaluation-harness with the opdlm model (opdlm lm-eval --model opdlm --model_args ... --tasks ...)",
                lambda a: _delegate("nemo_opdlm.eval.lm_eval_cli", "lm_eval_main", a)),
}
"""Subcommand -> (one-line help, handler taking the remaining arguments). A handler imports what it
needs itself, after its own ``--help`` is answered: ``opdlm X --help`` must not wait for torch."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]
    argv = argv[1:] if debug else argv
    if argv[:1] == ["--version"]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"nemo-opdlm {version('nemo-opdlm')}")
        except PackageNotFoundError:  # run from a checkout that was not installed
            print("nemo-opdlm (not installed: run from a checkout)")
        return 0
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        print(f"opdlm: unknown command {argv[0]!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
              file=sys.stderr)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (help_, _) in COMMANDS.items())
        print(f"usage: opdlm [--debug] COMMAND [args]   (also: opdlm --version, python -m nemo_opdlm)\n\n"
              f"commands:\n{lines}\n\n"
              "A problem with the input (config, data, checkpoint, paths) is printed as one line with exit status 2.\n"
              f"--debug (or {DEBUG_ENV}=1): show its traceback instead.")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    return guarded(f"opdlm {argv[0]}", lambda: COMMANDS[argv[0]][1](argv[1:]), debug)


if __name__ == "__main__":
    sys.exit(main())
