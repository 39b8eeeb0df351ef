"""HF safetensors -> this rank's TP/PP shard of megatron-core chunks, and megatron checkpoints.

One job: fill the parameters of already-built ``DiffusionGPTModel`` chunks (teacher or student, at
whatever TP/PP/VPP layout megatron-core was initialised with) straight from a Hugging Face
directory, reading only the rows each rank owns, tensor by tensor, shard file by shard file, and
``import_hf``: an HF directory saved as a megatron-core checkpoint. Non-goals: building the parallel
runtime (``runtime/distributed.py``), dist-checkpoint I/O itself (``checkpoint/format.py``), exporting
(``mcore_to_hf.py``).

Memory: a rank holds its model chunks plus one HF tensor slice at a time; files are read with
plain reads (no memory map), so the resident set does not grow with the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Optional

import torch

from nemo_opdlm.checkpoint.errors import ArchitectureMismatchError, CheckpointFileError, VocabMismatchError
from nemo_opdlm.checkpoint.format import DIST_CHECKPOINT, check_finite, save_dist_checkpoint
from nemo_opdlm.checkpoint.staging import check_target
from nemo_opdlm.convert import hf_config as hfc
from nemo_opdlm.convert.errors import ConvertError, UnsupportedArchitectureError
from nemo_opdlm.convert.key_maps import (GATE_UP, IGNORED_HF_SUFFIXES, QKV, Rule, expected_hf_shapes, fuse_gate_up,
                                         fuse_qkv, rule_for, shard_rows, split_layer_name)
from nemo_opdlm.convert.safetensors_io import SafetensorsFile
from nemo_opdlm.models.config import ModelConfig
from nemo_opdlm.models.describe import architecture_differences, fix_fields
from nemo_opdlm.models.gpt import DiffusionGPTModel
from nemo_opdlm.models.student import unwrap
from nemo_opdlm.models.teacher import build_teacher
from nemo_opdlm.runtime.context import ParallelContext

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class HFCheckpoint:
    """The weights of an HF directory: the index (or single file) and every shard's header, checked.

    Opening reads only headers; every shard named by the index must exist and parse, and every
    tensor the index names must be in the shard it points to.
    """

    def __init__(self, hf_dir: str) -> None:
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointFileError(f"{index_path} is not a valid safetensors index ({err!r})") from None
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            weight_map = {name: SINGLE_FILE for name in SafetensorsFile(os.path.join(hf_dir, SINGLE_FILE)).entries}
        else:
            extra = " (found PyTorch .bin weights: re-save them with safe_serialization)" if any(
                n.endswith(".bin") for n in os.listdir(hf_dir)) else ""
            raise CheckpointFileError(f"{hf_dir} has neither {INDEX_FILE} nor {SINGLE_FILE}{extra}")
        self.shard_names = sorted(set(weight_map.values()))
        missing = [s for s in self.shard_names if not os.path.isfile(os.path.join(hf_dir, s))]
        if missing:
            raise CheckpointFileError(f"{hf_dir} is missing shard file(s) named by its index: {missing}")
        self.files = {s: SafetensorsFile(os.path.join(hf_dir, s)) for s in self.shard_names}
        for name, shard in weight_map.items():
            if name not in self.files[shard].entries:
                raise CheckpointFileError(f"the index says {name!r} is in {shard}, but that file does not contain it")
        self.weight_map = weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.weight_map[name]].entries[name].shape

    def position(self, name: str) -> tuple[int, int]:
        """(shard number, byte offset): the order in which reading is sequential."""
        shard = self.weight_map[name]
        return self.shard_names.index(shard), self.files[shard].entries[name].begin

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Tensor ``name`` (or rows of it), refused when it holds NaN/inf (``check_finite``)."""
        if name not in self.weight_map:
            raise CheckpointFileError(f"{self.hf_dir} has no tensor {name!r}")
        tensor = self.files[self.weight_map[name]].read(name, rows)
        check_finite(tensor, name, os.path.join(self.hf_dir, self.weight_map[name]))
        return tensor

    def check_matches(self, cfg: ModelConfig, prefix: str = "") -> None:
        """The directory holds ``cfg``'s model: its config.json agrees on every architecture field
        (the differing ones are named, as ``{prefix}field``, e.g. ``model.num_layers``), and every
        tensor of ``cfg``'s architecture is present with its shape, and nothing unknown is."""
        check_hf_config(self.hf_dir, cfg, prefix)
        expected = expected_hf_shapes(cfg)
        missing = sorted(set(expected) - set(self.weight_map))
        if missing:
            raise CheckpointFileError(
                f"{self.hf_dir} lacks {len(missing)} tensor(s) the model being loaded has, e.g. {missing[:4]}"
            )
        ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unknown = sorted(n for n in set(self.weight_map) - set(expected) - ignorable
                         if not n.endswith(IGNORED_HF_SUFFIXES))
        layers = sorted({int(m.group(1)) for m in map(_LAYER.match, unknown) if m})
        if layers and layers[0] >= cfg.num_layers:
            raise CheckpointFileError(f"{self.hf_dir} has layers up to {layers[-1]} but the model being loaded has "
                                      f"{prefix}num_layers={cfg.num_layers}")
        if unknown:
            raise UnsupportedArchitectureError(
                f"{self.hf_dir} has {len(unknown)} tensor(s) the {cfg.family} converter does not know, "
                f"e.g. {unknown[:4]}: the checkpoint uses an architecture feature that is not supported"
            )
        for name, shape in expected.items():
            found = self.shape(name)
            if found != shape:
                vocab = name in ("model.embed_tokens.weight", "lm_head.weight")
                kind = VocabMismatchError if vocab else CheckpointFileError
                raise kind(f"{name} has shape {found} in {self.hf_dir} but the model being loaded expects {shape}")


def check_hf_config(hf_dir: str, cfg: ModelConfig, prefix: str = "") -> None:
    """``hf_dir``'s config.json (when it has one this converter reads) describes ``cfg``'s
    architecture; else every differing field is named (as ``{prefix}field``, ``cfg``'s value first).
    Reads one small file: callers check before they build a model."""
    try:
        theirs = hfc.model_config_from_hf(hfc.read_hf_config(hf_dir))
    except (ConvertError, KeyError, ValueError, TypeError):
        return  # no usable config.json: the tensors alone are checked
    differ = architecture_differences(cfg, theirs, prefix)
    if differ:
        raise ArchitectureMismatchError(
            f"{hf_dir}/config.json describes another model than the one being loaded: {'; '.join(differ)} "
            f"(the loaded model's value first): {fix_fields(prefix)}")


def check_layout(cfg: ModelConfig, parallel: ParallelContext) -> None:
    """``parallel``'s layout must divide the model (heads, groups, FFN, layers)."""
    from nemo_opdlm.runtime.distributed import ParallelLayout

    ParallelLayout(tp=parallel.tp_size, pp=parallel.pp_size, vpp=parallel.vpp_size).check_model(cfg, where="")


def parameter_sources(chunk: DiffusionGPTModel,
                      cfg: ModelConfig) -> Iterable[tuple[str, torch.Tensor, Rule, list[str]]]:
    """(local name, tensor, rule, HF names) for every parameter of one chunk, in state-dict order.

    Raises if a parameter has no HF source: an unmapped parameter would stay randomly initialised.
    """
    for name, tensor in chunk.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        layer, template = split_layer_name(name)
        rule = rule_for(template, cfg, is_tied_output=cfg.tie_word_embeddings)
        if rule is None:
            raise ConvertError(f"megatron parameter {name} has no Hugging Face source in the {cfg.family} key map")
        global_layer = None if layer is None else chunk.decoder.layers[layer].layer_number - 1
        yield name, tensor, rule, [n.format(i=global_layer) for n in rule.hf]


def read_tp_shard(ckpt: HFCheckpoint, rule: Rule, hf_names: list[str], cfg: ModelConfig,
                  tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of one megatron parameter, read from the HF tensors it is made of.

    Vocabulary tensors come back with only their real rows (the caller zero-fills the padding).
    """
    parts = []
    for j, name in enumerate(hf_names):
        part = ckpt.read(name, shard_rows(rule, cfg, j, tp_rank, tp_size))
        if rule.tp_axis == 1 and tp_size > 1:
            part = part.chunk(tp_size, dim=1)[tp_rank]  # [H, in/tp] view of one full read
        parts.append(part)
    if rule.fuse == QKV:
        return fuse_qkv(*parts, groups=cfg.num_query_groups // tp_size)
    if rule.fuse == GATE_UP:
        return fuse_gate_up(*parts)
    return parts[0]


@torch.no_grad()
def load_hf_weights(chunks: list[torch.nn.Module], ckpt: HFCheckpoint | str, cfg: ModelConfig,
                    checked_as: Optional[ModelConfig] = None) -> None:
    """Fill this rank's chunks from an HF directory (any TP/PP/VPP layout; zero vocab padding).
    ``checked_as``: the architecture the directory must hold when ``cfg`` reads only its first
    ``cfg.vocab_size`` vocabulary rows (a teacher cut to its student's, ``RunConfig.teacher_built``)."""
    if isinstance(ckpt, str):
        ckpt = HFCheckpoint(ckpt)
    ckpt.check_matches(checked_as or cfg)
    parallel = unwrap(chunks[0]).parallel
    tp_rank, tp_size = parallel.tp_rank, parallel.tp_size
    work = [item for chunk in chunks for item in parameter_sources(unwrap(chunk), cfg)]
    work.sort(key=lambda item: ckpt.position(item[3][0]))  # stream the shards in file order
    for name, param, rule, hf_names in work:
        shard = read_tp_shard(ckpt, rule, hf_names, cfg, tp_rank, tp_size)
        rows = shard.shape[0]
        if rule.vocab:
            if shard.shape[1:] != param.shape[1:] or rows > param.shape[0]:
                raise ConvertError(f"{name}: HF rows {tuple(shard.shape)} do not fit {tuple(param.shape)}")
            param[:rows].copy_(shard)
            param[rows:].zero_()
        else:
            if shard.shape != param.shape:
                raise ConvertError(f"{name}: HF gives {tuple(shard.shape)}, megatron expects {tuple(param.shape)}")
            param.copy_(shard)
        del shard


def without_random_init(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` for building chunks whose every weight is about to be loaded.

    megatron-core's random initialisation (a full fp32 master copy per weight on CPU) costs time
    and peak memory and is overwritten anyway; ``load_hf_weights`` refuses parameters it cannot
    fill, so nothing stays uninitialised.
    """
    return cfg.replace(extra={**cfg.extra, "perform_initialization": False})


def _prepare(hf_dir: str, parallel: ParallelContext, overrides: dict[str, Any]) -> tuple[ModelConfig, HFCheckpoint]:
    cfg = hfc.model_config_from_hf(hfc.read_hf_config(hf_dir), **overrides)
    hfc.check_tokenizer_fits(hf_dir, cfg.vocab_size)
    check_layout(cfg, parallel)
    ckpt = HFCheckpoint(hf_dir)
    ckpt.check_matches(cfg)
    return cfg, ckpt


def teacher_from_hf(hf_dir: str, parallel: ParallelContext,
                    **overrides: Any) -> tuple[ModelConfig, list[DiffusionGPTModel]]:
    """Frozen teacher chunks for ``parallel``'s layout, weights read from ``hf_dir``.

    ``overrides`` replace ModelConfig fields (e.g. ``attention_backend``, ``params_dtype``).
    """
    cfg, ckpt = _prepare(hf_dir, parallel, overrides)
    chunks = build_teacher(without_random_init(cfg), parallel)
    load_hf_weights(chunks, ckpt, cfg)
    return cfg, chunks


def import_hf(hf_dir: str, ckpt_dir: str, parallel: ParallelContext, *, overwrite: bool = False,
              **overrides: Any) -> ModelConfig:
    """HF directory -> megatron-core torch_dist checkpoint, read at ``parallel``'s layout (collective)."""
    check_target(ckpt_dir, overwrite, DIST_CHECKPOINT)  # refuse before spending time on loading
    cfg, chunks = teacher_from_hf(hf_dir, parallel, **overrides)
    save_dist_checkpoint(chunks, cfg, ckpt_dir, hf_config=hfc.read_hf_config(hf_dir), assets_dir=hf_dir,
                         overwrite=overwrite)
    return cfg
