"""megatron-core distributed (torch_dist) checkpoints of model chunks: save, load at any layout, metadata.

One job: the on-disk format every part of the package shares (the importer, the exporter, the
trainer's checkpoints, evaluation): megatron-core's sharded files with global layer keys, so any
TP/PP/VPP layout can load them, plus ``opdlm_convert.json`` (the ModelConfig, the source HF config,
the diffusion settings) and ``hf_assets/`` (config + tokenizer files). Non-goals: HF safetensors
(``convert/hf_to_mcore.py``, ``convert/mcore_to_hf.py``), optimizer state (``training/checkpoint.py``)
and the trainer's step directories (``run_dir.py``). ``manifest.json`` (``manifest.py``: every file's
size and BLAKE2b digest) is written at save and checked before a load, so a damaged file is named
instead of loading silently wrong weights or failing with a bare ``EOFError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Iterable, Optional

import torch

from nemo_opdlm.checkpoint.errors import ArchitectureMismatchError, CheckpointFileError, VocabMismatchError
from nemo_opdlm.checkpoint.manifest import MANIFEST, damage, write_manifest
from nemo_opdlm.checkpoint.staging import OutputKind, staged_dir
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.models.describe import architecture_differences, fix_fields, model_config_from_dict, model_config_to_dict
from nemo_opdlm.models.student import unwrap
from nemo_opdlm.runtime.comm import barrier, broadcast_object, is_rank0

META_FILE = "opdlm_convert.json"
ASSETS_DIR = "hf_assets"
META_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
"""The tokenizer files (beside ``config.json``) a checkpoint keeps in ``hf_assets/`` and an export copies."""
DIST_CHECKPOINT = OutputKind("megatron-core checkpoint", (
    "metadata.json", ".metadata", "common.pt", "*.distcp", META_FILE, MANIFEST, ASSETS_DIR))
"""Everything :func:`save_dist_checkpoint` writes: ``--overwrite`` replaces such a checkpoint only."""


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

    with staged_dir(ckpt_dir, overwrite, DIST_CHECKPOINT) as staging:
        dist_checkpointing.save(sharded_model_state(chunks), staging)
        barrier()  # every rank's shards are on disk before rank 0 lists them
        if is_rank0():
            write_metadata(staging, cfg, hf_config=hf_config, diffusion=diffusion, assets_dir=assets_dir)


def write_metadata(directory: str, cfg: ModelConfig, *, hf_config: Optional[dict[str, Any]] = None,
                   diffusion: Optional[DiffusionConfig] = None, assets_dir: Optional[str] = None,
                   **extra: Any) -> None:
    """What a checkpoint carries beside megatron's files (rank 0, once every rank's shards are down):
    ``opdlm_convert.json`` (the ModelConfig, the source HF config, the diffusion settings and
    ``extra`` fields such as a training step), ``hf_assets/`` (config + tokenizer files of
    ``assets_dir``) and the ``manifest.json`` of every file, written last."""
    meta = {
        "format_version": META_VERSION,
        "model_config": model_config_to_dict(cfg),
        "hf_config": hf_config,
        "diffusion": None if diffusion is None else dataclasses.asdict(diffusion),
        **extra,
    }
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    _copy_assets(assets_dir, os.path.join(directory, ASSETS_DIR), ("config.json",) + TOKENIZER_FILES)
    write_manifest(directory)


def read_checkpoint_meta(ckpt_dir: str) -> Optional[dict[str, Any]]:
    """The converter's metadata of a checkpoint, or None for checkpoints written by other code."""
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_checkpoint_config(ckpt_dir: str, cfg: ModelConfig, prefix: str = "") -> None:
    """The model description stored with a checkpoint (``opdlm_convert.json``; absent: nothing to
    check) agrees with ``cfg`` on every architecture field, else each differing one is named (as
    ``{prefix}field``, ``cfg``'s value first)."""
    meta = read_checkpoint_meta(ckpt_dir) or {}
    if not meta.get("model_config"):
        return
    differ = architecture_differences(cfg, model_config_from_dict(meta["model_config"]), prefix)
    if differ:
        raise ArchitectureMismatchError(
            f"{ckpt_dir} holds another model than the one being loaded: {'; '.join(differ)} (the loaded model's "
            f"value first): {fix_fields(prefix)}")


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
def check_finite(tensor: torch.Tensor, name: str, where: str) -> None:
    """Refuse a weight holding NaN/inf as it is read, naming it: loaded, it would surface only after
    a training step, as a diverged run ("lower optim.lr") whose losses read 0. One pass over a
    tensor already in memory; integer tensors cannot hold either."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    kinds = " and ".join(k for k, hit in (("NaN", bool(torch.isnan(tensor).any())),
                                           ("inf", bool(torch.isinf(tensor).any()))) if hit)
    raise CheckpointFileError(f"{where}: the weight {name!r} holds {kinds} ({bad} of {tensor.numel()} values): the "
                              "weights are damaged; download or export them again (the model cannot learn from them)")


def load_dist_checkpoint(chunks: list[torch.nn.Module], ckpt_dir: str, *, prefix: str = "",
                         cfg: Optional[ModelConfig] = None, global_groups: bool = True,
                         checked_as: Optional[ModelConfig] = None) -> None:
    """Load a torch_dist checkpoint saved at any TP/PP into this rank's chunks (``global_groups``
    False: chunks on process groups of their own, a teacher at ``parallel.teacher``'s layout).

    The padded vocabulary depends on TP (``ModelConfig.padded_vocab_size``), so a checkpoint
    saved at another TP can have more or fewer padding rows than this layout: such vocabulary
    tensors are read whole and re-cut here (real rows copied, padding zero-filled); everything
    else goes through megatron-core's resharding unchanged. ``checked_as``: the architecture the
    checkpoint must hold when ``cfg`` reads only its first ``cfg.vocab_size`` vocabulary rows (a
    teacher cut to its student's, ``RunConfig.teacher_built``): the same re-cut drops the rest.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    problem = broadcast_object(damage(ckpt_dir) if is_rank0() else None)  # first: a removed common.pt is damage
    if problem:
        raise CheckpointFileError(f"cannot load {ckpt_dir}: {problem}")
    check_readable(ckpt_dir)
    if cfg is not None:
        check_checkpoint_config(ckpt_dir, checked_as or cfg)
    saved = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    tp_rank = unwrap(chunks[0]).parallel.tp_rank
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
    # megatron-core stamps replica ids from its global groups (the student's): they do not describe a
    # teacher on groups of its own (parallel.teacher), whose integrity check would then fail. Reading
    # does not depend on them: each rank reads the pieces its shard's offsets name.
    loaded = dist_checkpointing.load(sharded, ckpt_dir, validate_access_integrity=global_groups and not recut)
    for ckey, skey, _, real in recut:
        full = loaded[ckey][skey]
        local = sharded_local_rows(chunks, ckey, skey)
        start = tp_rank * local
        piece = torch.zeros(local, *full.shape[1:], dtype=full.dtype)
        n = max(0, min(real - start, local))
        piece[:n] = full[start:start + n]
        loaded[ckey][skey] = piece
    for ckey, chunk in zip(_chunk_keys(chunks), chunks):
        _check_finite_state(loaded[ckey], ckpt_dir)
        unwrap(chunk).load_state_dict(loaded[ckey], strict=True)


def _check_finite_state(state: dict[str, Any], ckpt_dir: str) -> None:
    """Every loaded weight is finite (``check_finite``, which names the first that is not)."""
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            check_finite(value, key, ckpt_dir)


def sharded_local_rows(chunks: list[torch.nn.Module], ckey: str, skey: str) -> int:
    chunk = chunks[_chunk_keys(chunks).index(ckey)]
    return unwrap(chunk).state_dict()[skey].shape[0]
