"""HF ``config.json`` <-> :class:`ModelConfig`, for Qwen3, Qwen2/2.5 and Llama 3.x.

One job: translate architecture descriptions both ways and refuse, by name, any HF feature the
megatron model does not implement (sliding windows, o_proj biases, other RoPE types, other
activations), instead of converting it into a silently different model. Reads both the
transformers 5 spelling (``rope_parameters``) and the 4.x one (``rope_theta`` + ``rope_scaling``).
Non-goals: weights (``hf_to_mcore.py``, ``mcore_to_hf.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from nemo_opdlm.checkpoint.errors import VocabMismatchError
from nemo_opdlm.convert.errors import UnsupportedArchitectureError
from nemo_opdlm.models.families import ARCHITECTURES, FAMILIES
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig, RopeScaling

STUDENT_ARCHITECTURE = "OPDLMBlockDiffusionLM"
STUDENT_MODEL_TYPE = "opdlm_block_diffusion"
SDAR_ARCHITECTURE = "SDARForCausalLM"
"""An SDAR-format export's architecture (``convert/sdar.py``); its weights keep Qwen3's names too."""
MODELING_MODULE = "modeling_opdlm"
ATTENTION_KIND = "block_causal"
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
                "bf16": "bfloat16", "fp16": "float16"}


VOCABULARY_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
"""Files of which a tokenizer directory holds at least one (the rest of ``TOKENIZER_FILES`` come
beside them: merges, templates, generation settings; ``checkpoint.format.TOKENIZER_FILES``)."""


def has_tokenizer_files(directory: str) -> bool:
    """``directory`` holds a tokenizer (checked before ``AutoTokenizer``, whose answer for a folder
    without one is a traceback about sentencepiece)."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in VOCABULARY_FILES)


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UnsupportedArchitectureError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def family_of(hf: dict[str, Any]) -> str:
    """'qwen3', 'qwen2' or 'llama' from ``architectures`` (or ``model_type``); else a clear error."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs:
        for name, fam in FAMILIES.items():
            if hf.get("model_type") == fam.model_type:
                return name
    found = archs or [hf.get("model_type")]
    raise UnsupportedArchitectureError(
        f"architecture {found} is not supported; supported: {', '.join(supported_architectures())}"
    )


def _rope(hf: dict[str, Any]) -> tuple[float, Optional[RopeScaling]]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params} if legacy else params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedArchitectureError(
            f"rope type {rope_type!r} is not supported; supported: 'default' and 'llama3'"
        )
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _refuse_unsupported(hf: dict[str, Any], family: str) -> None:
    arch = FAMILIES[family].architecture
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"{arch} with hidden_act={act!r}: only 'silu' (SwiGLU) is supported")
    if family in ("qwen3", "llama") and hf.get("attention_bias"):
        raise UnsupportedArchitectureError(
            f"{arch} with attention_bias=true (a bias on o_proj too) is not supported"
        )
    if hf.get("mlp_bias"):
        raise UnsupportedArchitectureError(f"{arch} with mlp_bias=true is not supported")
    if hf.get("use_sliding_window"):
        raise UnsupportedArchitectureError(f"{arch} with use_sliding_window=true is not supported")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedArchitectureError(f"{arch} with layer_types {sorted(set(layer_types))}: only full_attention")


def hf_dtype(hf: dict[str, Any]) -> str:
    raw = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return TORCH_DTYPES.get(str(raw).replace("torch.", ""), "float32")


def is_student_config(hf: dict[str, Any]) -> bool:
    """An exported block-diffusion student's config.json (``student_hf_config``'s output, or an
    SDAR-format export's, ``sdar.sdar_hf_config``)."""
    archs = hf.get("architectures") or []
    return STUDENT_ARCHITECTURE in archs or hf.get("model_type") == STUDENT_MODEL_TYPE or SDAR_ARCHITECTURE in archs


def source_config_of_student(hf: dict[str, Any]) -> dict[str, Any]:
    """The AR config.json an exported student's config.json restates (its weights keep the source's
    names), so that every reader of AR configs also reads an exported student."""
    arch = hf.get("source_architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"exported student with source_architecture={arch!r}; supported: {', '.join(supported_architectures())}")
    fam = FAMILIES[ARCHITECTURES[arch]]
    rope: dict[str, Any] = {"rope_theta": hf.get("rope_theta", 10000.0), "rope_type": "default"}
    scaling = hf.get("rope_scaling") or {}  # the SDAR format spells Llama-3.1 scaling as Qwen3 does
    llama3 = hf.get("rope_llama3") or ({k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
                                       if scaling.get("rope_type", scaling.get("type")) == "llama3" else None)
    if llama3:
        rope.update(rope_type="llama3", **llama3)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "dtype",
            "bos_token_id", "eos_token_id", "pad_token_id")
    return {"architectures": [arch], "model_type": fam.model_type, "hidden_act": "silu", "rope_parameters": rope,
            **{k: hf[k] for k in keys if k in hf}}


def student_diffusion(hf: dict[str, Any]) -> DiffusionConfig:
    """The diffusion settings recorded in an exported student's config.json (no ``block_grid``: an
    export written before the setting existed, whose student was trained on the response grid)."""
    if hf.get("mask_token_id") is None:
        raise UnsupportedArchitectureError("exported student config.json has no mask_token_id: re-export it with "
                                           "tools/export_hf.py --mask-token-id")
    return DiffusionConfig(mask_token_id=int(hf["mask_token_id"]), block_size=int(hf.get("block_size", 4)),
                           shift_logits=bool(hf.get("shift_logits", False)),
                           block_grid=hf.get("block_grid") or "response")


def model_config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of an HF config dict (an AR model's, or an exported student's);
    ``overrides`` replace any field.

    ``params_dtype`` defaults to the checkpoint's dtype, so a bf16 checkpoint becomes a bf16 model
    (no copy in a wider type) and round-trips bit for bit.
    """
    if is_student_config(hf):
        hf = source_config_of_student(hf)
    family = family_of(hf)
    _refuse_unsupported(hf, family)
    fam = FAMILIES[family]
    theta, scaling = _rope(hf)
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads == int(hf["hidden_size"]):
        head_dim = None  # the default: keep one spelling of the same architecture
    fields: dict[str, Any] = dict(
        family=family,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rotary_base=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_layernorm=fam.qk_layernorm,
        add_qkv_bias=fam.add_qkv_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        params_dtype=hf_dtype(hf),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers-5 style HF config.json for ``cfg`` (used when no source config is known)."""
    fam = FAMILIES[cfg.family]
    rope: dict[str, Any] = {"rope_theta": cfg.rotary_base, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rope = {"rope_theta": cfg.rotary_base, "rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    hf: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "hidden_act": "silu",
        **shape_fields(cfg),
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": cfg.params_dtype,
    }
    if cfg.family != "qwen2":
        hf["attention_bias"] = False
    return hf


def shape_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config fields that give the decoder's shape (shared by the AR and student configs)."""
    return {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
    }


def student_hf_config(cfg: ModelConfig, diffusion: DiffusionConfig, source: Optional[dict[str, Any]]) -> dict[str, Any]:
    """config.json of an exported block-diffusion student, read by ``hf_modeling/modeling_opdlm.py``.

    Keeps the source's non-architecture fields (token ids, dtype, ...) and names the source
    architecture, so tooling can tell what the student was made from.
    """
    source = dict(source or hf_config_from_model(cfg))
    keep = {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source}
    out: dict[str, Any] = {
        "architectures": [STUDENT_ARCHITECTURE],
        "model_type": STUDENT_MODEL_TYPE,
        "auto_map": {
            "AutoConfig": f"{MODELING_MODULE}.OPDLMConfig",
            "AutoModel": f"{MODELING_MODULE}.{STUDENT_ARCHITECTURE}",
            "AutoModelForCausalLM": f"{MODELING_MODULE}.{STUDENT_ARCHITECTURE}",
        },
        "source_architecture": FAMILIES[cfg.family].architecture,
        "source_model_type": FAMILIES[cfg.family].model_type,
        **shape_fields(cfg),
        "rope_theta": cfg.rotary_base,
        "rope_llama3": dataclasses.asdict(cfg.rope_scaling) if cfg.rope_scaling is not None else None,
        "qk_norm": cfg.qk_layernorm,
        "qkv_bias": cfg.add_qkv_bias,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "dtype": cfg.params_dtype,
        "mask_token_id": diffusion.mask_token_id,
        "block_size": diffusion.block_size,
        "shift_logits": diffusion.shift_logits,
        "block_grid": diffusion.block_grid,
        "attention_kind": ATTENTION_KIND,
        **keep,
    }
    return out


def tokenizer_vocab_size(hf_dir: str) -> Optional[int]:
    """1 + the largest token id in ``tokenizer.json`` (vocab + added tokens), or None if absent."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tok = json.load(f)
    ids = list((tok.get("model") or {}).get("vocab", {}).values()) if isinstance(
        (tok.get("model") or {}).get("vocab"), dict) else []
    ids += [t["id"] for t in tok.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def check_tokenizer_fits(hf_dir: str, vocab_size: int) -> None:
    """Every token id the tokenizer can produce must be a row of the embedding."""
    n = tokenizer_vocab_size(hf_dir)
    if n is not None and n > vocab_size:
        raise VocabMismatchError(
            f"the tokenizer in {hf_dir} has token ids up to {n - 1} but the model's vocab_size is "
            f"{vocab_size}: tokenizer and weights come from different models"
        )


def check_same_vocab(teacher: ModelConfig, student: ModelConfig) -> None:
    """Distillation compares distributions over one vocabulary: the sizes must agree."""
    if teacher.vocab_size != student.vocab_size:
        raise VocabMismatchError(
            f"teacher vocab_size={teacher.vocab_size} != student vocab_size={student.vocab_size}: "
            "teacher and student must share a tokenizer"
        )
