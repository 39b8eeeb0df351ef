"""What a :class:`ModelConfig` is, written down and compared: its dict form and its architecture fields.

One job: the model description a checkpoint records (``checkpoint/format.py``'s ``opdlm_convert.json``)
and the comparison of two descriptions of one model, field by field, that every reader of weights
makes before loading them (the checkpoint loader, the HF importer and exporter, the trainer's resume
check, ``opdlm plan``). Non-goals: HF ``config.json`` translation (``convert/hf_config.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from nemo_opdlm.models.config import ModelConfig, RopeScaling


def model_config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    data = dict(data)
    if data.get("rope_scaling") is not None:
        data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
    return ModelConfig(**data)


ARCHITECTURE_FIELDS: dict[str, Optional[str]] = {
    "family": "architectures", "num_layers": "num_hidden_layers", "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
    "rotary_base": "rope_theta", "rope_scaling": "rope_scaling", "norm_eps": "rms_norm_eps",
    "qk_layernorm": None, "add_qkv_bias": None, "tie_word_embeddings": "tie_word_embeddings",
}
"""The :class:`ModelConfig` fields that decide the weights' shapes or what the model computes, with
their config.json names (None: implied by the architecture); ``head_dim`` is compared as resolved
(``kv_channels``). Not compared: how a model is run (dtype, backends, recompute, vocabulary
padding) and ``max_position_embeddings``, a usage limit no weight depends on."""


def architecture_differences(ours: ModelConfig, theirs: ModelConfig, prefix: str = "") -> list[str]:
    """Every architecture field on which two configs disagree, as ``{prefix}field=A vs hf_name=B``
    (``prefix``: how the reader names ``ours``' fields, e.g. ``model.``)."""
    out = []
    for name, hf_name in ARCHITECTURE_FIELDS.items():
        attr = "kv_channels" if name == "head_dim" else name
        a, b = getattr(ours, attr), getattr(theirs, attr)
        if a != b:
            out.append(f"{prefix}{name}={a!r} vs {hf_name or name}={b!r}")
    return out


def fix_fields(prefix: str) -> str:
    """The remedy for :func:`architecture_differences`: the fields to set, or the weights to load."""
    fields = f"{prefix}*" if prefix else "the model config"
    return f"set {fields} to the checkpoint's values, or load the checkpoint meant for this model"
