"""Configuration of a block-diffusion student exported by nemo_opdlm in the SDAR layout.

One job: describe the model the way the engines that serve SDAR models read it (SGLang, lmdeploy and
JetEngine load this class with ``trust_remote_code``: Qwen3's fields under Qwen3's names, ``model_type``
``sdar``), plus the facts of the student that ``modeling_sdar.py``'s ``generate`` decodes with
(``mask_token_id``, ``block_size``, ``block_grid``, ``shift_logits``). The engines take the block size
as a run-time setting and ignore the extra fields. Imports nothing but ``transformers``, so that an
engine's process (or any process without nemo_opdlm) loads it.
"""

from __future__ import annotations

from typing import Optional

from transformers import PretrainedConfig


class SDARConfig(PretrainedConfig):
    """Qwen3's decoder (q/k norms, SwiGLU, RoPE) as a block-diffusion model."""

    model_type = "sdar"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 1024,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 16,
        num_key_value_heads: Optional[int] = 8,
        head_dim: Optional[int] = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 40960,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1_000_000.0,
        rope_scaling: Optional[dict] = None,
        attention_bias: bool = False,
        use_sliding_window: bool = False,
        sliding_window: Optional[int] = None,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: Optional[int] = 151669,
        block_size: int = 4,
        block_grid: str = "absolute",
        shift_logits: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.block_grid = block_grid
        self.shift_logits = shift_logits
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings

    # What modeling_opdlm.py's decoder reads, derived (properties: never written to config.json).
    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalises queries and keys per head (the engines always do)."""
        return True

    @property
    def qkv_bias(self) -> bool:
        return bool(self.attention_bias)

    @property
    def rope_llama3(self) -> Optional[dict]:
        """Llama-3.1 RoPE scaling, if ``rope_scaling`` names it (None: plain RoPE). transformers 5
        also spells plain RoPE as ``{'rope_type': 'default', ...}``."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) != "llama3":
            return None
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {k: scaling[k] for k in keys}
