"""The resolved run config on disk (``config.yaml``), and what a resumed run's config changed.

One job: write the config a run actually uses, as YAML, into the run directory (the run that last
started there) and into every ``step_N/`` (the run that wrote that checkpoint), and, on resume,
compare the starting config with the checkpoint's: a different model is refused (its weights would be
loaded into another architecture), every other change is listed and the new config wins (``optim.*``
and ``train.steps`` through ``optim.resume_schedule``, the rest because it is what this run reads).
Non-goals: the weights' own shape check at load (megatron-core's strict load), what wins for the
optimizer's schedule (``optim.py``).

A checkpoint written before this file existed has no ``config.yaml``: its model is taken from
``opdlm_convert.json`` (every trainer checkpoint has one), and no other change can be listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from nemo_opdlm.config import RunConfig, dump_yaml, from_dict, to_dict
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.config import ModelConfig
from nemo_opdlm.models.grid import recorded_grid
from nemo_opdlm.checkpoint.run_dir import CONFIG as CONFIG_FILE
from nemo_opdlm.checkpoint.run_dir import step_of


def write(directory: str, cfg: RunConfig) -> str:
    """``directory/config.yaml`` with ``cfg`` as ``opdlm train --recipe`` reads it back, written whole
    (a temporary file renamed into place)."""
    path = os.path.join(directory, CONFIG_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(dump_yaml(cfg))
    os.replace(tmp, path)
    return path


def read(directory: str) -> Optional[dict[str, Any]]:
    """The config saved in ``directory`` as a plain dict (not validated: it may predate a schema
    change), or None when there is none."""
    import yaml

    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


WHERE_KEYS = ("train.save_dir", "train.resume", "train.overwrite")
"""Where a run lives and how it starts, not what it trains: a moved run directory is no change."""


def changes(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """``key: saved -> now`` for every config key whose value differs (keys only one side has count),
    except ``WHERE_KEYS``."""
    old, new = _flat(saved), _flat(to_dict(cfg))
    missing = object()
    out = []
    for key in [k for k in old if k not in WHERE_KEYS] + [k for k in new if k not in old and k not in WHERE_KEYS]:
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            out.append(f"{key}: {'(unset)' if a is missing else a!r} -> {'(unset)' if b is missing else b!r}")
    return out


def _model(section: Any) -> Optional[ModelConfig]:
    try:
        return from_dict(ModelConfig, section) if isinstance(section, dict) else None
    except ConfigError:
        return None  # saved under an older schema: the weights' strict load still checks the shapes


def model_differences(saved_model: Optional[ModelConfig], now: ModelConfig, prefix: str) -> list[str]:
    """``prefix+field: saved -> now`` for every architecture field (``models.describe.ARCHITECTURE_FIELDS``:
    what decides the weights' shapes or what they compute; not dtype, back ends or recompute)."""
    from nemo_opdlm.models.describe import ARCHITECTURE_FIELDS

    if saved_model is None:
        return []
    out = []
    for name in ARCHITECTURE_FIELDS:
        attr = "kv_channels" if name == "head_dim" else name
        a, b = getattr(saved_model, attr), getattr(now, attr)
        if a != b:
            out.append(f"{prefix}{name}: {a!r} -> {b!r}")
    return out


@dataclass
class ResumeCheck:
    """What a resumed run's config changed against its checkpoint's."""

    source: str
    """The saved config compared with (a ``config.yaml``, or ``opdlm_convert.json`` for older checkpoints)."""
    changed: list[str]
    """``key: saved -> now`` for every other change; the starting config wins for each."""


def check_steps(ckpt_dir: str, cfg: RunConfig) -> None:
    """A resume needs ``train.steps`` at least the checkpoint's step: below it the run would start
    "step 4 of 2" and run nothing (``train.steps`` is the whole schedule's length, not the steps
    still to run)."""
    done = step_of(ckpt_dir)
    if cfg.train.steps < done:
        raise ConfigError(
            f"cannot resume from {ckpt_dir}: it is at step {done}, past train.steps={cfg.train.steps} (the whole run's "
            f"length, not the steps still to run): set train.steps above {done} to train further, or start a new run "
            "(another train.save_dir, or train.resume=false train.overwrite=true)")


def check_resume(ckpt_dir: str, cfg: RunConfig) -> ResumeCheck:
    """Compare ``cfg`` with the config of the checkpoint a run resumes from. Raises ConfigError naming
    each differing architecture field when the student's or the teacher's model differs, or both
    block grids when the grid differs (a checkpoint older than ``diffusion.block_grid`` records
    'response': ``models.grid.recorded_grid``), or ``train.steps`` below its step (``check_steps``)."""
    check_steps(ckpt_dir, cfg)
    saved = read(ckpt_dir)
    if saved is not None:
        source = os.path.join(ckpt_dir, CONFIG_FILE)
        student = _model(saved.get("model"))
        differ = model_differences(student, cfg.model, "model.")
        if saved.get("teacher_model") is not None or cfg.teacher_model is not None:  # else the teacher is the student
            teacher = _model(saved.get("teacher_model")) or student
            differ += model_differences(teacher, cfg.teacher, "teacher_model.")
        saved_diffusion = saved.get("diffusion")
    else:
        from nemo_opdlm.checkpoint.format import META_FILE, read_checkpoint_meta
        from nemo_opdlm.models.describe import model_config_from_dict

        source = os.path.join(ckpt_dir, META_FILE)
        meta = read_checkpoint_meta(ckpt_dir) or {}
        student = model_config_from_dict(meta["model_config"]) if meta.get("model_config") else None
        differ = model_differences(student, cfg.model, "model.")
        saved_diffusion = meta.get("diffusion")
    grid, _ = recorded_grid(saved_diffusion, ckpt_dir)
    if grid is not None and grid != cfg.diffusion.block_grid:
        raise ConfigError(
            f"cannot resume from {ckpt_dir}: it was trained on the {grid!r} block grid and the config asks for "
            f"{cfg.diffusion.block_grid!r} (diffusion.block_grid): set diffusion.block_grid={grid} to resume it, or "
            "start a new run (another train.save_dir)")
    if differ:
        raise ConfigError(
            f"cannot resume from {ckpt_dir}: the config's model differs from the one that wrote it "
            f"({'; '.join(differ)}; saved first, see {source}). Its weights belong to the saved model: set "
            "those fields back to resume it, or start a new run (another train.save_dir, or "
            "train.resume=false train.overwrite=true to replace this one)")
    return ResumeCheck(source, changes(saved, cfg) if saved is not None else [])
