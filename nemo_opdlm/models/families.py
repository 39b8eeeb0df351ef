"""The architecture families this project builds and converts: the one list of them.

One job: name each supported family and the facts that tell them apart (the HF architecture and
model type, per-head q/k norms, q/k/v biases). ``ModelConfig.family`` must be one of them; the HF
converters (``convert/``) look the facts up here. Non-goals: the parameter name tables
(``convert/key_maps.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One HF architecture this project converts."""

    architecture: str
    """``architectures[0]`` in the HF config.json."""
    model_type: str
    """``model_type`` in the HF config.json."""
    qk_layernorm: bool
    """The architecture has per-head RMSNorm on q and k."""
    add_qkv_bias: bool
    """The architecture has biases on q/k/v (and none on the output projection)."""


FAMILIES: dict[str, Family] = {
    "qwen3": Family(architecture="Qwen3ForCausalLM", model_type="qwen3", qk_layernorm=True, add_qkv_bias=False),
    "qwen2": Family(architecture="Qwen2ForCausalLM", model_type="qwen2", qk_layernorm=False, add_qkv_bias=True),
    "llama": Family(architecture="LlamaForCausalLM", model_type="llama", qk_layernorm=False, add_qkv_bias=False),
}
ARCHITECTURES = {fam.architecture: name for name, fam in FAMILIES.items()}
