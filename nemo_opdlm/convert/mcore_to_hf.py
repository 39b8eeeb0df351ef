"""megatron-core chunks (or a torch_dist checkpoint at any TP/PP) -> a Hugging Face directory.

One job: write the weights under the source architecture's HF names (safetensors shards + index),
the config.json, the tokenizer files, and, for a block-diffusion student, the self-contained
``modeling_opdlm.py`` that ``transformers`` loads with ``trust_remote_code=True`` (its tokenizer,
generation_config.json and model card come from ``export_assets.py``). A student exported in the
SDAR format (``export_format='sdar'``, ``sdar.py``) gets SDAR's config.json and remote-code files
instead, so that SGLang, lmdeploy and JetEngine serve it. A teacher (no diffusion
settings) is written back as its original architecture, config.json verbatim (but for the dtype
of the weights written).
Non-goals: training-time checkpoints (``training/checkpoint.py``), loading HF (``hf_to_mcore.py``).

How ranks share the work: each parameter's TP shards are all-gathered inside its TP group; the
TP-rank-0, DP-rank-0 member of each pipeline stage writes that stage's tensors to its own shard
files; rank 0 then names the files ``model-0000k-of-0000n.safetensors`` in layer order and writes
the index. Nothing is written outside a staging directory until every rank has finished.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch
import torch.distributed as dist

from nemo_opdlm.checkpoint.errors import ArchitectureMismatchError
from nemo_opdlm.checkpoint.format import (ASSETS_DIR, TOKENIZER_FILES, load_dist_checkpoint,
                                          read_checkpoint_meta)
from nemo_opdlm.checkpoint.staging import OutputKind, check_target, staged_dir
from nemo_opdlm.convert import hf_config as hfc
from nemo_opdlm.convert.errors import ConvertError
from nemo_opdlm.convert import sdar
from nemo_opdlm.convert.export_assets import (DEFAULT_MAX_NEW_TOKENS, MASK_TOKEN, MODEL_CARD, CardFacts,
                                              trained_with, write_student_assets)
from nemo_opdlm.convert.hf_to_mcore import INDEX_FILE, SINGLE_FILE, check_layout, parameter_sources, without_random_init
from nemo_opdlm.convert.key_maps import to_hf
from nemo_opdlm.convert.safetensors_io import write_safetensors
from nemo_opdlm.runtime.comm import is_rank0
from nemo_opdlm.rollout.decode import DecodeConfig
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.models.describe import architecture_differences, model_config_from_dict
from nemo_opdlm.models.families import FAMILIES
from nemo_opdlm.models.student import build_chunks, unwrap
from nemo_opdlm.runtime.context import ParallelContext

MODELING_FILE = os.path.join(sdar.HF_MODELING_DIR, "modeling_opdlm.py")
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
HF_EXPORT = OutputKind("Hugging Face export", (
    "config.json", "*.safetensors", INDEX_FILE, f"{hfc.MODELING_MODULE}.py", *sdar.SDAR_FILES, MODEL_CARD,
    *TOKENIZER_FILES))
"""Everything an export writes: ``--overwrite`` replaces a previous export, never other files."""


def _gather_tp(tensor: torch.Tensor, parallel: ParallelContext) -> list[torch.Tensor]:
    """Every TP rank's shard of one parameter (in rank order)."""
    if parallel.tp_size == 1:
        return [tensor.detach()]
    parts = [torch.empty_like(tensor) for _ in range(parallel.tp_size)]
    dist.all_gather(parts, tensor.detach().contiguous(), group=parallel.tp_group)
    return parts


class _ShardWriter:
    """Buffers (name, tensor) pairs and writes a safetensors file whenever the buffer is full."""

    def __init__(self, directory: str, tag: str, max_bytes: int) -> None:
        self.directory, self.tag, self.max_bytes = directory, tag, max_bytes
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.files: list[dict[str, Any]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.append((name, tensor))
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f"part-{self.tag}-{len(self.files):05d}.safetensors"
        nbytes = write_safetensors(os.path.join(self.directory, fname), self.pending)
        self.files.append({"file": fname, "names": [n for n, _ in self.pending], "bytes": nbytes})
        self.pending, self.pending_bytes = [], 0


def _write_weights(chunks: list[torch.nn.Module], cfg: ModelConfig, directory: str, max_bytes: int,
                   dtype: Optional[torch.dtype]) -> list[dict[str, Any]]:
    """Write this stage's tensors (if this rank is its writer); return (virtual stage, file records)."""
    par = unwrap(chunks[0]).parallel
    writer = par.tp_rank == 0 and par.dp_rank == 0
    # megatron keeps some modules (torch RMSNorm) in fp32 whatever params_dtype says: the HF
    # checkpoint gets one dtype, the model's, unless told otherwise.
    dtype = dtype or cfg.dtype
    records = []
    for ci, chunk in enumerate(chunks):
        stage = ci * par.pp_size + par.pp_rank  # virtual stage order = layer order
        out = _ShardWriter(directory, f"{stage:05d}", max_bytes)
        for name, tensor, rule, hf_names in parameter_sources(unwrap(chunk), cfg):
            if name == "output_layer.weight" and cfg.tie_word_embeddings:
                continue  # the last stage's copy of a tied embedding: the embedding is exported
            shards = _gather_tp(tensor, par) if rule.tp_axis is not None else [tensor.detach()]
            if writer:
                for hf_name, value in zip(hf_names, to_hf(rule, cfg, shards)):
                    out.add(hf_name, value.to(dtype))
            del shards
        out.flush()
        records.extend({"stage": stage, **rec} for rec in out.files)
    return records


def _name_shards(directory: str, records: list[dict[str, Any]]) -> None:
    """Rename the stage files to HF's names and write the index (single file: no index)."""
    records = sorted(records, key=lambda r: (r["stage"], r["file"]))
    n = len(records)
    weight_map: dict[str, str] = {}
    for k, rec in enumerate(records, start=1):
        final = SINGLE_FILE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(directory, rec["file"]), os.path.join(directory, final))
        weight_map.update({name: final for name in rec["names"]})
    if n > 1:
        index = {"metadata": {"total_size": sum(r["bytes"] for r in records)},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)


def _all_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not (dist.is_available() and dist.is_initialized()):
        return records
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return [r for rank_records in everyone for r in rank_records]


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def export_chunks(
    chunks: list[torch.nn.Module],
    cfg: ModelConfig,
    out_dir: str,
    *,
    source_config: Optional[dict[str, Any]] = None,
    diffusion: Optional[DiffusionConfig] = None,
    assets_dir: Optional[str] = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: Optional[torch.dtype] = None,
    decoding: Optional[DecodeConfig] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    card: Optional[CardFacts] = None,
    export_format: str = "opdlm",
    allow_grid_mismatch: bool = False,
) -> None:
    """Write the chunks (this rank's share of a model at any layout) as an HF directory.

    Collective: every rank calls it. Args:
        source_config: the HF config.json the model came from; written verbatim for a teacher.
        diffusion: the student's settings; None exports the unchanged AR architecture.
        assets_dir: where tokenizer files (and generation_config.json) are copied from.
        dtype: cast weights on the way out (default: the model's ``params_dtype``); config.json says which.
        decoding, max_new_tokens, card: a student's default decoding (generation_config.json;
            None: static, one token per round) and model card facts.
        export_format: 'opdlm' (this project's layout) or 'sdar' (what SGLang, lmdeploy and
            JetEngine serve; a student that does not fit is refused before anything is written,
            ``sdar.check_sdar_export``, and ``allow_grid_mismatch`` lets a response-grid one through).
    """
    check_layout(cfg, unwrap(chunks[0]).parallel)
    check_export_format(cfg, diffusion, export_format, allow_grid_mismatch)
    with staged_dir(out_dir, overwrite, HF_EXPORT) as staging:
        records = _all_records(_write_weights(chunks, cfg, staging, max_shard_bytes, dtype))
        if is_rank0():
            _name_shards(staging, records)
            write_hf_metadata(staging, cfg, source_config=source_config, diffusion=diffusion, assets_dir=assets_dir,
                              dtype=dtype_name(dtype or cfg.dtype), decoding=decoding, max_new_tokens=max_new_tokens,
                              card=card,
                              export_format=export_format, allow_grid_mismatch=allow_grid_mismatch)


def check_export_format(cfg: ModelConfig, diffusion: Optional[DiffusionConfig], export_format: str,
                        allow_grid_mismatch: bool = False) -> Optional[str]:
    """Refuse an unknown format, or a model the format cannot hold (``sdar.check_sdar_export``);
    returns the SDAR card's grid warning, if any. Reads nothing: callers refuse before writing."""
    if export_format not in sdar.EXPORT_FORMATS:
        raise ConvertError(f"--format {export_format!r} is not an export format; choose one of {sdar.EXPORT_FORMATS}")
    if export_format == "opdlm":
        return None
    if diffusion is None:
        raise ConvertError("--format sdar exports a block-diffusion student, but this is an AR teacher (no diffusion "
                           "settings, or --teacher): export it with --format opdlm, or give --mask-token-id")
    return sdar.check_sdar_export(cfg, diffusion, allow_grid_mismatch)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: config.json's spelling."""
    return str(dtype).replace("torch.", "")


def write_hf_metadata(directory: str, cfg: ModelConfig, *, source_config: Optional[dict[str, Any]],
                      diffusion: Optional[DiffusionConfig], assets_dir: Optional[str], dtype: Optional[str] = None,
                      decoding: Optional[DecodeConfig] = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                      card: Optional[CardFacts] = None,
                      export_format: str = "opdlm", allow_grid_mismatch: bool = False) -> None:
    """config.json (``dtype``: the weights' dtype as written), the tokenizer, and for a student the
    modeling file(s), generation_config.json and README.md (``export_format``: see ``export_chunks``)."""
    if diffusion is None:
        for name in TOKENIZER_FILES:
            path = os.path.join(assets_dir, name) if assets_dir else ""
            if path and os.path.isfile(path):
                shutil.copy2(path, os.path.join(directory, name))
        config = dict(source_config) if source_config is not None else hfc.hf_config_from_model(cfg)
        if dtype is not None and hfc.hf_dtype(config) != dtype:
            config.pop("torch_dtype", None)
            config["dtype"] = dtype
        _write_json(os.path.join(directory, "config.json"), config)
        return
    warning = check_export_format(cfg, diffusion, export_format, allow_grid_mismatch)
    dtype = dtype or cfg.params_dtype
    facts = card or CardFacts(checkpoint="memory")
    as_sdar = export_format == "sdar"

    def serve_sections(gen: dict[str, Any]) -> list[str]:
        if not as_sdar:
            return []
        settings = sdar.ServeSettings(block_size=diffusion.block_size, steps_per_block=gen["steps_per_block"],
                                      threshold=gen["threshold"])
        return [sdar.serve_section(settings, trained_with(diffusion, facts))]

    eos = write_student_assets(directory, FAMILIES[cfg.family].architecture, diffusion, source_config=source_config,
                               assets_dir=assets_dir, decoding=decoding or DecodeConfig(),
                               max_new_tokens=max_new_tokens, facts=facts, dtype=dtype,
                               mask_token=sdar.SDAR_MASK_TOKEN if as_sdar else MASK_TOKEN, card_warning=warning,
                               card_sections=serve_sections)
    if as_sdar:
        config = sdar.sdar_hf_config(cfg, diffusion, source_config, dtype)
        modeling_files = sdar.SDAR_FILES
    else:
        config = hfc.student_hf_config(cfg, diffusion, source_config)
        config["dtype"] = dtype
        modeling_files = (hfc.MODELING_MODULE + ".py",)
    if config.get("eos_token_id") is None and eos:
        config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    _write_json(os.path.join(directory, "config.json"), config)
    for name in modeling_files:
        shutil.copy2(os.path.join(sdar.HF_MODELING_DIR, name), os.path.join(directory, name))


def resolve_export(ckpt_dir: str, *, hf_source: Optional[str] = None, model_config: Optional[ModelConfig] = None,
                   **overrides: Any) -> tuple[ModelConfig, Optional[dict[str, Any]], Optional[str]]:
    """``(architecture, source HF config, tokenizer directory)`` of an export of ``ckpt_dir``, checked.

    The architecture comes from, in order: ``model_config``, the checkpoint's own
    ``opdlm_convert.json``, or ``hf_source``'s config.json. An ``hf_source`` that describes another
    model than the checkpoint (any field of ``models.describe.ARCHITECTURE_FIELDS``) is refused with
    every differing field named: its config.json and tokenizer would be written beside weights
    they do not describe. Reads only small files, so the tool can refuse before the runtime starts.
    """
    meta = read_checkpoint_meta(ckpt_dir) or {}
    source_config = meta.get("hf_config")
    assets_dir = os.path.join(ckpt_dir, ASSETS_DIR) if os.path.isdir(os.path.join(ckpt_dir, ASSETS_DIR)) else None
    if hf_source is not None:
        source_config, assets_dir = hfc.read_hf_config(hf_source), hf_source
    cfg = model_config
    if cfg is None and meta.get("model_config"):
        cfg = model_config_from_dict(meta["model_config"])
    if cfg is None and source_config is not None:
        cfg = hfc.model_config_from_hf(source_config)
    if cfg is None:
        raise ConvertError(f"{ckpt_dir} carries no model description: pass hf_source (--hf-source) or model_config")
    if overrides:
        cfg = cfg.replace(**overrides)
    if source_config is not None:
        differ = architecture_differences(cfg, hfc.model_config_from_hf(source_config))
        if differ:
            source = os.path.join(hf_source, "config.json") if hf_source else f"{ckpt_dir}'s stored HF config"
            raise ArchitectureMismatchError(
                f"{source} describes another model than {ckpt_dir}: {'; '.join(differ)} (the checkpoint's value "
                "first): pass the HF directory the checkpoint was made from (--hf-source)")
    if assets_dir is not None:
        hfc.check_tokenizer_fits(assets_dir, cfg.vocab_size)
    return cfg, source_config, assets_dir


def export_checkpoint(
    ckpt_dir: str,
    out_dir: str,
    parallel: ParallelContext,
    *,
    diffusion: Optional[DiffusionConfig] = None,
    as_teacher: bool = False,
    hf_source: Optional[str] = None,
    model_config: Optional[ModelConfig] = None,
    prefix: str = "",
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: Optional[torch.dtype] = None,
    decoding: Optional[DecodeConfig] = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    eval_results: Optional[list[dict[str, Any]]] = None,
    export_format: str = "opdlm",
    allow_grid_mismatch: bool = False,
    **overrides: Any,
) -> ModelConfig:
    """A torch_dist checkpoint (saved at any TP/PP) -> HF directory, read at ``parallel``'s layout.

    The architecture, source config and tokenizer come from :func:`resolve_export`. Diffusion
    settings come from ``diffusion`` or the checkpoint's metadata; ``as_teacher`` forces the AR
    export. ``prefix`` is the sharded-key prefix of the model inside a training checkpoint, if any.
    ``decoding`` and ``eval_results`` (``opdlm eval --output`` entries) go into a student's
    generation_config.json and model card; ``export_format`` and ``allow_grid_mismatch``: see
    :func:`export_chunks` (checked before the checkpoint is read).
    """
    check_target(out_dir, overwrite, HF_EXPORT)
    meta = read_checkpoint_meta(ckpt_dir) or {}
    cfg, source_config, assets_dir = resolve_export(ckpt_dir, hf_source=hf_source, model_config=model_config,
                                                    **overrides)
    if diffusion is None and meta.get("diffusion") and not as_teacher:
        diffusion = DiffusionConfig(**meta["diffusion"])
    if as_teacher:
        diffusion = None
    check_export_format(cfg, diffusion, export_format, allow_grid_mismatch)
    check_layout(cfg, parallel)
    chunks = build_chunks(without_random_init(cfg), parallel)
    load_dist_checkpoint(chunks, ckpt_dir, prefix=prefix, cfg=cfg)
    card = run_facts(ckpt_dir, meta.get("step"), source_config, hf_source, eval_results)
    export_chunks(chunks, cfg, out_dir, source_config=source_config, diffusion=diffusion, assets_dir=assets_dir,
                  overwrite=overwrite, max_shard_bytes=max_shard_bytes, dtype=dtype, decoding=decoding,
                  max_new_tokens=max_new_tokens, card=card,
                  export_format=export_format, allow_grid_mismatch=allow_grid_mismatch)
    return cfg


def run_facts(ckpt_dir: str, step: Optional[int], source_config: Optional[dict[str, Any]], hf_source: Optional[str],
              eval_results: Optional[list[dict[str, Any]]]) -> CardFacts:
    """What the model card can say about the run that wrote ``ckpt_dir``: the run's saved
    ``config.yaml`` (its ``distill.method`` and ``init.teacher_hf``) and the rollouts' tokens per
    round at ``step`` (the run directory's ``metrics.jsonl``), where they exist."""
    import yaml

    facts = CardFacts(checkpoint=ckpt_dir, step=step, eval_results=list(eval_results or []))
    run_dir = os.path.dirname(os.path.normpath(ckpt_dir))
    for path in (os.path.join(ckpt_dir, "config.yaml"), os.path.join(run_dir, "config.yaml")):
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    data = yaml.safe_load(f) or {}
                facts.method = (data.get("distill") or {}).get("method")
                facts.teacher = (data.get("init") or {}).get("teacher_hf")
                facts.rollout = {k: v for k, v in (data.get("rollout") or {}).items()
                                 if k in ("mode", "threshold", "steps_per_block", "temperature", "static_fraction")}
            except (OSError, yaml.YAMLError, AttributeError):
                pass
            break
    facts.teacher = facts.teacher or (source_config or {}).get("_name_or_path") or hf_source
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if step is not None and os.path.isfile(metrics):
        with open(metrics) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("step", step + 1) <= step and row.get("rollout/tokens_per_round") is not None:
                    facts.rollout_tokens_per_round = float(row["rollout/tokens_per_round"])
    return facts
