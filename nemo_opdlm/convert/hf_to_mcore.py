"""HF safetensors -> this rank's TP/PP shard of megatron-core chunks, and megatron checkpoints.

One job: fill the parameters of already-built ``DiffusionGPTModel`` chunks (teacher or student, at
whatever TP/PP/VPP layout megatron-core was initialised with) straight from a Hugging Face
directory, reading only the rows each rank owns, tensor by tensor, shard file by shard file; and
save/load megatron-core distributed (torch_dist) checkpoints of such chunks that any layout can
load. Non-goals: building the parallel runtime (``runtime/distributed.py``), exporting
(``mcore_to_hf.py``).

Memory: a rank holds its model chunks plus one HF tensor slice at a time; files are read with
plain reads (no memory map), so the resident set does not grow with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Iterable, Optional

import torch

from nemo_opdlm.convert import hf_config as hfc
from nemo_opdlm.convert.errors import (CheckpointFileError, ConvertError, UnsupportedArchitectureError,
                                       VocabMismatchError)
from nemo_opdlm.convert.key_maps import (GATE_UP, IGNORED_HF_SUFFIXES, QKV, Rule, expected_hf_shapes, fuse_gate_up,
                                         fuse_qkv, rule_for, shard_rows, split_layer_name)
from nemo_opdlm.convert.safetensors_io import SafetensorsFile
from nemo_opdlm.convert.staging import check_target, is_rank0, staged_dir
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.models.gpt import DiffusionGPTModel
from nemo_opdlm.models.student import build_student, unwrap
from nemo_opdlm.models.teacher import build_teacher

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
META_FILE = "opdlm_convert.json"
ASSETS_DIR = "hf_assets"
META_VERSION = 1


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
        if name not in self.weight_map:
            raise CheckpointFileError(f"{self.hf_dir} has no tensor {name!r}")
        return self.files[self.weight_map[name]].read(name, rows)

    def check_matches(self, cfg: ModelConfig) -> None:
        """Every tensor of ``cfg``'s architecture is present with its shape; nothing unknown is."""
        expected = expected_hf_shapes(cfg)
        missing = sorted(set(expected) - set(self.weight_map))
        if missing:
            raise CheckpointFileError(
                f"{self.hf_dir} lacks {len(missing)} tensor(s) its config.json implies, e.g. {missing[:4]}"
            )
        ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        unknown = sorted(n for n in set(self.weight_map) - set(expected) - ignorable
                         if not n.endswith(IGNORED_HF_SUFFIXES))
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
                raise kind(f"{name} has shape {found} in {self.hf_dir} but config.json implies {shape}")


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def check_layout(cfg: ModelConfig) -> None:
    """The current megatron-core layout must divide the model (heads, groups, FFN, layers)."""
    from megatron.core import parallel_state

    from nemo_opdlm.runtime.distributed import ParallelLayout

    ParallelLayout(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    ).check_model(cfg)


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
def load_hf_weights(chunks: list[torch.nn.Module], ckpt: HFCheckpoint | str, cfg: ModelConfig) -> None:
    """Fill this rank's chunks from an HF directory (any TP/PP/VPP layout; zero vocab padding)."""
    if isinstance(ckpt, str):
        ckpt = HFCheckpoint(ckpt)
    ckpt.check_matches(cfg)
    tp_rank, tp_size = _tp()
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


def _prepare(hf_dir: str, overrides: dict[str, Any]) -> tuple[ModelConfig, HFCheckpoint]:
    cfg = hfc.model_config_from_hf(hfc.read_hf_config(hf_dir), **overrides)
    hfc.check_tokenizer_fits(hf_dir, cfg.vocab_size)
    check_layout(cfg)
    ckpt = HFCheckpoint(hf_dir)
    ckpt.check_matches(cfg)
    return cfg, ckpt


def teacher_from_hf(hf_dir: str, **overrides: Any) -> tuple[ModelConfig, list[DiffusionGPTModel]]:
    """Frozen teacher chunks for the current parallel state, weights read from ``hf_dir``.

    ``overrides`` replace ModelConfig fields (e.g. ``attention_backend``, ``params_dtype``).
    """
    cfg, ckpt = _prepare(hf_dir, overrides)
    chunks = build_teacher(without_random_init(cfg))
    load_hf_weights(chunks, ckpt, cfg)
    return cfg, chunks


def student_from_hf(hf_dir: str, diffusion: DiffusionConfig, *, teacher: Optional[ModelConfig] = None,
                    **overrides: Any) -> tuple[ModelConfig, list[DiffusionGPTModel]]:
    """Trainable student chunks initialised from ``hf_dir`` (the teacher's weights, unchanged).

    With ``teacher`` given, the two vocabularies must agree (they share one tokenizer).
    """
    cfg, ckpt = _prepare(hf_dir, overrides)
    if teacher is not None:
        hfc.check_same_vocab(teacher, cfg)
    chunks = build_student(without_random_init(cfg), diffusion)
    load_hf_weights(chunks, ckpt, cfg)
    return cfg, chunks


# ---------------------------------------------------------------------------------------------
# megatron-core distributed checkpoints (torch_dist).
# ---------------------------------------------------------------------------------------------


def _chunk_keys(chunks: list[torch.nn.Module]) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def sharded_model_state(chunks: list[torch.nn.Module], prefix: str = "") -> dict[str, Any]:
    """megatron-core's sharded state dict of the chunks (global layer keys: any layout can load)."""
    return {key: unwrap(c).sharded_state_dict(prefix=prefix) for key, c in zip(_chunk_keys(chunks), chunks)}


def _copy_assets(src_dir: Optional[str], dst_dir: str, names: Iterable[str]) -> None:
    if not src_dir:
        return
    os.makedirs(dst_dir, exist_ok=True)
    for name in names:
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst_dir, name))


def save_dist_checkpoint(
    chunks: list[torch.nn.Module],
    cfg: ModelConfig,
    ckpt_dir: str,
    *,
    hf_config: Optional[dict[str, Any]] = None,
    assets_dir: Optional[str] = None,
    diffusion: Optional[DiffusionConfig] = None,
    overwrite: bool = False,
) -> None:
    """Save the chunks as a torch_dist checkpoint (collective: every rank calls it).

    Beside megatron's files it writes ``opdlm_convert.json`` (ModelConfig, source HF config,
    diffusion settings) and ``hf_assets/`` (config + tokenizer files), so that the exporter needs
    nothing but the checkpoint directory. Written to a staging directory, then renamed.
    """
    from megatron.core import dist_checkpointing

    meta = {
        "format_version": META_VERSION,
        "model_config": hfc.model_config_to_dict(cfg),
        "hf_config": hf_config,
        "diffusion": None if diffusion is None else dataclasses.asdict(diffusion),
    }
    with staged_dir(ckpt_dir, overwrite) as staging:
        dist_checkpointing.save(sharded_model_state(chunks), staging)
        if is_rank0():
            with open(os.path.join(staging, META_FILE), "w") as f:
                json.dump(meta, f, indent=2)
            _copy_assets(assets_dir, os.path.join(staging, ASSETS_DIR), ("config.json",) + hfc.TOKENIZER_FILES)


def read_checkpoint_meta(ckpt_dir: str) -> Optional[dict[str, Any]]:
    """The converter's metadata of a checkpoint, or None for checkpoints written by other code."""
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def check_readable(ckpt_dir: str) -> None:
    """Refuse, naming the reason, a directory the installed megatron-core cannot load.

    megatron-core >= 0.17 keeps the common (non-tensor) state inside the torch_dist files and
    writes no ``common.pt``; 0.16 reads that state from ``common.pt`` only (its ``load`` still
    takes a ``common_strategy``, which is how the older reader is recognised) and fails on a newer
    checkpoint with an unrelated AttributeError. Checkpoints written by 0.16 load on both.
    """
    import inspect

    import megatron.core
    from megatron.core import dist_checkpointing

    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise CheckpointFileError(f"{ckpt_dir} is not a megatron-core distributed checkpoint (no metadata.json)")
    reads_common_pt_only = "common_strategy" in inspect.signature(dist_checkpointing.load).parameters
    if reads_common_pt_only and not os.path.isfile(os.path.join(ckpt_dir, "common.pt")):
        version = getattr(megatron.core, "__version__", "?")
        raise CheckpointFileError(
            f"{ckpt_dir} was written by megatron-core >= 0.17 (no common.pt), which megatron-core {version} "
            "cannot read: read it with megatron-core >= 0.17 (Python >= 3.12), e.g. tools/export_hf.py to "
            "get a Hugging Face copy any version can import"
        )


@torch.no_grad()
def load_dist_checkpoint(chunks: list[torch.nn.Module], ckpt_dir: str, *, prefix: str = "",
                         cfg: Optional[ModelConfig] = None) -> None:
    """Load a torch_dist checkpoint saved at any TP/PP into this rank's chunks.

    The padded vocabulary depends on TP (``ModelConfig.padded_vocab_size``), so a checkpoint
    saved at another TP can have more or fewer padding rows than this layout: such vocabulary
    tensors are read whole and re-cut here (real rows copied, padding zero-filled); everything
    else goes through megatron-core's resharding unchanged.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    check_readable(ckpt_dir)
    saved = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    tp_rank, _ = _tp()
    sharded = sharded_model_state(chunks, prefix)
    recut: list[tuple[str, str, torch.Tensor, int]] = []  # (chunk key, state key, full tensor, real rows)
    for ckey, state in sharded.items():
        for skey, sh in list(state.items()):
            if not isinstance(sh, ShardedTensor):
                continue
            if sh.key not in saved:
                raise CheckpointFileError(f"{ckpt_dir} has no tensor {sh.key!r} (model/architecture mismatch?)")
            found = tuple(saved[sh.key].global_shape)
            if skey not in VOCAB_KEYS:
                if found != tuple(sh.global_shape):
                    raise CheckpointFileError(
                        f"{sh.key}: checkpoint shape {found}, model expects {tuple(sh.global_shape)}")
                continue
            real = cfg.vocab_size if cfg is not None else unwrap(chunks[0]).real_vocab_size
            if found[0] < real or found[1:] != tuple(sh.global_shape[1:]):
                raise VocabMismatchError(
                    f"{sh.key}: checkpoint holds {found}, the model's vocabulary is {real} x {sh.global_shape[1]}")
            if found == tuple(sh.global_shape):
                continue
            full = torch.empty(found, dtype=sh.data.dtype)  # [V_saved, H], replicated on every rank
            state[skey] = ShardedTensor.from_rank_offsets(sh.key, full, replica_id=0)
            recut.append((ckey, skey, full, real))
    loaded = dist_checkpointing.load(sharded, ckpt_dir, validate_access_integrity=not recut)
    for ckey, skey, _, real in recut:
        full = loaded[ckey][skey]
        local = sharded_local_rows(chunks, ckey, skey)
        start = tp_rank * local
        piece = torch.zeros(local, *full.shape[1:], dtype=full.dtype)
        n = max(0, min(real - start, local))
        piece[:n] = full[start:start + n]
        loaded[ckey][skey] = piece
    for ckey, chunk in zip(_chunk_keys(chunks), chunks):
        unwrap(chunk).load_state_dict(loaded[ckey], strict=True)


def sharded_local_rows(chunks: list[torch.nn.Module], ckey: str, skey: str) -> int:
    chunk = chunks[_chunk_keys(chunks).index(ckey)]
    return unwrap(chunk).state_dict()[skey].shape[0]


def import_hf(hf_dir: str, ckpt_dir: str, *, overwrite: bool = False, **overrides: Any) -> ModelConfig:
    """HF directory -> megatron-core torch_dist checkpoint at the current layout (collective)."""
    check_target(ckpt_dir, overwrite)  # refuse before spending time on loading
    cfg, chunks = teacher_from_hf(hf_dir, **overrides)
    save_dist_checkpoint(chunks, cfg, ckpt_dir, hf_config=hfc.read_hf_config(hf_dir), assets_dir=hf_dir,
                         overwrite=overwrite)
    return cfg
