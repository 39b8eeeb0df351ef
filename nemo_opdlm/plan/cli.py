"""``opdlm plan``: the command (also ``python -m nemo_opdlm.plan``, what the Slurm script runs)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

from nemo_opdlm.errors import ConfigError, OPDLMError
from nemo_opdlm.plan.layout import GPUS, Cluster, usable_bytes
from nemo_opdlm.plan.report import format_report, make_plan


def recipe_cluster(spec: str) -> Optional[Cluster]:
    """The cluster a recipe function was registered for (``@recipe``), or a YAML recipe's ``# cluster:``
    header (``opdlm recipes --export``); None when neither says."""
    if spec.endswith((".yaml", ".yml")):
        from nemo_opdlm.recipes.export import yaml_cluster

        shape = yaml_cluster(spec)
        return None if shape is None else Cluster(*shape)
    try:
        from nemo_opdlm.recipes.base import CLUSTERS
    except ImportError:
        return None
    shape = CLUSTERS.get(spec.replace(":", ".").rpartition(".")[2])
    return None if shape is None else Cluster(shape.nodes, shape.gpus_per_node, shape.gpu)


def _get(cfg, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if node is None:  # under an unset section (parallel.teacher.tp with the shared layout): unset too
            return None
        if part == "teacher" and node is cfg:
            node = cfg.teacher
            continue
        if not hasattr(node, part):
            raise ConfigError(f"--get {key}: no field {part!r}")
        node = getattr(node, part)
    return node


def plan_doc() -> str:
    import nemo_opdlm.plan

    return nemo_opdlm.plan.__doc__ or ""


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opdlm plan", description=plan_doc().split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe (module:function, a bare recipe name, or a YAML file such as recipes/NAME.yaml); "
                        "left out, the first --config is the whole config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.micro_batch_size=2")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="a partial YAML config merged on top of the recipe before the overrides (repeatable)")
    p.add_argument("--gpu", choices=sorted(GPUS), default=None, help="GPU kind (default: the recipe's)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: the recipe's)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: the recipe's)")
    p.add_argument("--require-paths", action="store_true",
                   help="refuse when checkpoints or data are missing here (run inside the job)")
    p.add_argument("--get", action="append", default=[], metavar="KEY",
                   help="print a resolved config value (e.g. parallel.tp) and exit; repeatable")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    p.add_argument("--measure", action="store_true",
                   help="also run one micro-batch of the real step under fake tensors at the recipe's shape and "
                        "print the measured memory beside the plan (about a minute on a CPU; PP=1 layouts)")
    return p.parse_intermixed_args(argv)


def plan_main(argv: Optional[Sequence[str]] = None) -> int:
    """``opdlm plan``: 0 if the plan is valid and fits, 1 if refused, 2 if the config itself is invalid."""
    args = parse_args(argv)
    from nemo_opdlm.recipes.lookup import base_spec, resolve

    if args.recipe and "=" in args.recipe and not os.path.exists(args.recipe):  # `plan --config F k=v`
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    try:
        args.recipe, args.config = base_spec(args.recipe, args.config)
        cfg = resolve(args.recipe, list(args.overrides), args.config)
        if args.get:
            for key in args.get:
                value = _get(cfg, key)
                print("" if value is None else value)
            return 0
        default = recipe_cluster(args.recipe) or Cluster(1, 8, "h100-80g")
        cluster = Cluster(nodes=args.nodes or default.nodes, gpus_per_node=args.gpus_per_node or default.gpus_per_node,
                          gpu=args.gpu or default.gpu)
        rep = make_plan(cfg, cluster, spec=args.recipe, require_paths=args.require_paths)
    except OPDLMError as err:
        print(f"opdlm plan: error: {err}", file=sys.stderr)
        return 2
    measured = None
    if args.measure:
        from nemo_opdlm.plan.measure import compare

        try:
            measured = compare(cfg, cluster)
        except OPDLMError as err:
            print(f"opdlm plan: error: --measure: {err}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps({"recipe": args.recipe, "cluster": dataclasses.asdict(cluster),
                          "shape": dataclasses.asdict(rep.shape), "stage": rep.memory.stage,
                          "static": rep.memory.static, "phases": rep.memory.phases,
                          "activations": rep.memory.activations, "peak_bytes": rep.memory.peak,
                          "usable_bytes": usable_bytes(cluster), "fits": rep.fits, "ok": rep.ok,
                          "findings": [dataclasses.asdict(f) for f in rep.findings], "measured": measured}, indent=2))
    else:
        print(format_report(rep))
        if measured is not None:
            from nemo_opdlm.plan.measure import format_comparison

            print(format_comparison(measured))
    return 0 if rep.ok else 1

