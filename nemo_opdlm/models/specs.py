"""Layer specs: the student and the teacher differ only here, in their core attention's spec.

One job: produce megatron-core ``ModuleSpec`` trees. Both models use megatron-core's GPT layer
(local modules, or Transformer Engine linear layers when configured) with the core-attention slot
filled by :class:`~nemo_opdlm.models.attention.BlockAttention`; whether a model is block-diffusion
or causal is decided by the token metadata it is given (``masks.py``), not by its modules, which
is what lets ``from_teacher`` copy weights one-to-one.
"""

from __future__ import annotations

import copy

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_opdlm.models.attention import BlockAttention
from nemo_opdlm.models.config import ModelConfig


def layer_spec(model: ModelConfig) -> ModuleSpec:
    """megatron-core GPT layer spec with the block-mask core attention."""
    from megatron.core.models.gpt import gpt_layer_specs

    if model.resolved_linear_impl() == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            qk_layernorm=model.qk_layernorm, normalization="RMSNorm"
        )
    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention
    attention.params = dict(attention.params or {}, attn_mask_type=AttnMaskType.arbitrary)
    attention.submodules.core_attention = ModuleSpec(
        module=BlockAttention, params={"backend": model.resolved_attention_backend()}
    )
    return spec
