"""Find a recipe function from what a user typed after ``--recipe``, and list the installed ones.

One job: turn ``tiny:tiny_self_tp1_pp1_2g``, ``tiny.tiny_self_tp1_pp1_2g``, a bare recipe name, the
old checkout spellings (``recipes.tiny:...``), a module of the user's own (``my_recipes:fn``, importable
or a ``.py`` path) into the function, and a name that is none of these into an error that names the
closest recipes (a module without a function, ``--recipe tiny``, lists that module's recipes).
:func:`load_recipe` calls it (or reads a whole YAML config instead) and :func:`resolve` puts
``--config`` overlays and ``key=value`` overrides on top (``config.compose``). Non-goals: the config
schema and its YAML mechanics (``nemo_opdlm.config``).

The recipes ship inside the package (``nemo_opdlm.recipes``, as ``megatron.bridge.recipes`` does), so an
installed wheel finds them from any directory.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Optional, Sequence

from nemo_opdlm.config import RunConfig, compose, load_yaml, read_yaml, to_dict
from nemo_opdlm.errors import ConfigError

PACKAGE = "nemo_opdlm.recipes"
MODULES = ("qwen3", "qwen25", "llama31", "tiny")
"""The package's recipe modules (``models`` and ``base`` hold shapes and helpers, no recipes)."""
OLD_PREFIXES = ("recipes.", "nemo_opdlm.recipes.")
"""Spellings of the package's modules that earlier versions and the checkout used."""


@dataclass(frozen=True)
class RecipeInfo:
    """One row of ``opdlm recipes``."""

    spec: str
    """``module:function``, what ``--recipe`` takes (the bare function name works too)."""
    cluster: str
    """The cluster it is sized for, e.g. ``1 x 8 h100-80g``."""
    summary: str
    """The first line of its docstring."""


def installed() -> dict[str, Callable]:
    """Every recipe the package ships, by function name."""
    from nemo_opdlm import recipes

    return dict(recipes.ALL_RECIPES)


def table() -> list[RecipeInfo]:
    """The installed recipes, GPU ones first, each with its cluster and what it does."""
    from nemo_opdlm import recipes

    rows = []
    for name, fn in installed().items():
        shape = recipes.CLUSTERS.get(name)
        cluster = f"{shape.nodes} x {shape.gpus_per_node} {shape.gpu}" if shape else "?"
        doc = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
        doc = doc.split(". ")[0].rstrip(".") + "."  # its first sentence
        rows.append(RecipeInfo(f"{fn.__module__.rpartition('.')[2]}:{name}", cluster, doc))
    return rows


def recipes_in(module: ModuleType) -> list[str]:
    """The recipe functions of a module: public, callable without arguments, annotated to return a
    RunConfig (not the ``@recipe`` decorator or the helpers a recipe module also holds)."""
    out = []
    for name, fn in vars(module).items():
        if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
            continue
        sig = inspect.signature(fn)
        required = [p for p in sig.parameters.values()
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        returns = sig.return_annotation
        if not required and getattr(returns, "__name__", returns) == "RunConfig":
            out.append(name)
    return sorted(out)


def _suggest(name: str, options: list[str], what: str) -> str:
    typed_prefix = sorted((o for o in options if name and o.startswith(name)), key=len)  # a name cut short
    close = (typed_prefix + [c for c in difflib.get_close_matches(name, options, n=3, cutoff=0.5)
                             if c not in typed_prefix])[:3]
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    shown = ", ".join(options[:6]) + (", ..." if len(options) > 6 else "")
    return f"; {what}: {shown} (opdlm recipes lists them all)"


def _package_module(module: str) -> Optional[str]:
    """The package module a user's module name means, or None (a module of their own)."""
    for prefix in OLD_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
    if module in ("recipes", "nemo_opdlm.recipes", ""):
        return PACKAGE
    return f"{PACKAGE}.{module}" if module in MODULES else None


def _import_own(module: str) -> ModuleType:
    """A recipe module of the user's: a ``.py`` file, or an importable module (the working directory
    counts, as it does for ``python -m``)."""
    if module.endswith(".py"):
        if not os.path.isfile(module):
            raise ConfigError(f"--recipe: recipe file {module} does not exist")
        spec = importlib.util.spec_from_file_location(os.path.basename(module)[:-3], module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.split(".")[0] != err.name.split(".")[0]:
            raise  # the module exists; something it imports does not
        hint = _suggest(module, list(MODULES), "recipe modules")
        raise ConfigError(f"recipe module {module!r} not found{hint}") from None


def not_a_recipe(obj: Any) -> Optional[str]:
    """What ``obj``, found under a recipe's name, is when it is not a recipe (None: nothing there, or
    nothing to say): a model shape or a helper needing arguments is named as such, since "not in
    MODULE" with an empty list sent users looking for a recipe that was right there."""
    if obj is None:
        return None
    if not callable(obj):
        return f"a {type(obj).__name__}"
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    returns = sig.return_annotation
    returns = getattr(returns, "__name__", returns)
    if returns == "ModelConfig":
        return "a model config (a function returning a ModelConfig, the model.* section of a recipe)"
    required = [p.name for p in sig.parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        shown = ", ".join(required[:5]) + (", ..." if len(required) > 5 else "")
        return f"a function needing arguments ({shown}) that recipes call"
    if returns not in (sig.empty, "RunConfig"):
        return f"a function returning {returns}"
    return None


def find(spec: str) -> Callable:
    """The recipe function ``spec`` names (see the module docstring for the spellings)."""
    if ":" in spec:
        module, _, name = spec.rpartition(":")
    elif spec.endswith(".py"):
        module, name = spec, ""
    else:
        module, _, name = spec.rpartition(".")
    known = installed()
    if not module:  # a bare name: a recipe, or a module of the package
        if name in known:
            return known[name]
        if name in MODULES or _package_module(name) == PACKAGE:
            module, name = name, ""
        else:
            raise ConfigError(f"no recipe named {name!r}" + _suggest(name, sorted(known), "recipes"))
    package_module = _package_module(module)
    mod = importlib.import_module(package_module) if package_module else _import_own(module)
    if package_module == PACKAGE:
        options = sorted(known)
    elif package_module:
        options = sorted(n for n, fn in known.items() if fn.__module__ == package_module)
    else:
        options = recipes_in(mod)
    label = module if package_module != PACKAGE else "the installed recipes"
    if not name:
        shown = ", ".join(f"{module}:{n}" for n in options[:8]) + (", ..." if len(options) > 8 else "")
        raise ConfigError(f"--recipe {spec} names a module, not a recipe: choose one of {shown} "
                          "(opdlm recipes lists them all)")
    fn = getattr(mod, name, None)
    if not inspect.isfunction(fn) or name not in options:
        what = not_a_recipe(fn)
        if what:
            held = ", ".join(options[:4]) + (", ..." if len(options) > 4 else "")
            raise ConfigError(f"--recipe {spec} is {what}, not a recipe (a function of no arguments returning a "
                              f"RunConfig): `opdlm recipes` lists the recipes" + (
                                  f", and {label} holds {held}" if options else ""))
        hint = _suggest(name, options, f"recipes in {label}") if options else \
            f"; {label} holds no recipes (opdlm recipes lists them all)"
        if fn is None and name in known:  # the right recipe under the wrong module
            hint = f"; it is {known[name].__module__.rpartition('.')[2]}:{name}"
        raise ConfigError(f"recipe {name!r} not in {label}{hint}")
    return fn


def load_recipe(spec: str) -> RunConfig:
    """A recipe: ``module:function`` (or ``module.function``, or the bare function name) of
    ``nemo_opdlm.recipes`` or of a module of the user's, returning a RunConfig; or a YAML path."""
    if spec.endswith((".yaml", ".yml")):
        return load_yaml(spec)
    if os.path.isfile(spec) and not spec.endswith(".py"):
        raise ConfigError(f"--recipe {spec} is a file but not a YAML config (.yaml / .yml); a recipe is "
                          "module:function, e.g. tiny:tiny_self_tp1_pp1_2g (opdlm recipes lists them)")
    cfg = find(spec)()
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"recipe {spec} returned {type(cfg).__name__}, not RunConfig")
    return cfg


def base_spec(spec: Optional[str], overlays: Sequence[str] = ()) -> tuple[str, list[str]]:
    """What the config starts from and the overlays on top: ``--recipe`` when given, else the first
    ``--config`` as a whole YAML config (``opdlm train --config recipes/NAME.yaml``)."""
    if spec:
        return spec, list(overlays)
    if not overlays:
        raise ConfigError("no config given: name a recipe (`opdlm recipes` lists them: opdlm train --recipe NAME, "
                          "opdlm plan NAME) or a whole YAML config (--config recipes/NAME.yaml)")
    if not overlays[0].endswith((".yaml", ".yml")):
        raise ConfigError(f"--config {overlays[0]}: without --recipe the first --config is the whole config, "
                          "a .yaml/.yml file (e.g. recipes/tiny_self_tp1_pp1_2g.yaml)")
    return overlays[0], list(overlays[1:])


def resolve(spec: Optional[str], overrides: Sequence[str] = (), overlays: Sequence[str] = ()) -> RunConfig:
    """Recipe (or whole YAML config), then partial YAML ``overlays``, then ``key=value`` overrides ->
    a validated RunConfig, completed from its files (``config.compose``). Without a recipe the first
    overlay is the whole config (:func:`base_spec`)."""
    spec, overlays = base_spec(spec, overlays)
    if not overrides and not overlays:
        return load_recipe(spec).complete()
    if spec.endswith((".yaml", ".yml")):
        return compose(read_yaml(spec), overlays, overrides, whole_yaml=spec)
    return compose(to_dict(load_recipe(spec)), overlays, overrides)
