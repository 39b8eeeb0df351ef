"""Architectures of the supported checkpoints, written from their published HF ``config.json``.

One job: the numbers (layers, widths, heads, vocabulary, RoPE, norms, tying) and the token facts a
recipe needs ([MASK] id, end-of-turn ids) for each model family. ``opdlm plan`` re-reads the real
``config.json`` when the checkpoint is on disk and refuses a recipe whose numbers differ.
Non-goals: training settings (``recipes/base.py``).

Sources: the ``config.json`` of Qwen/Qwen3-{0.6B,1.7B,4B,8B,32B}, Qwen/Qwen2.5-{7B,32B}-Instruct and
meta-llama/Llama-3.1-{8B,70B}-Instruct on the Hugging Face hub.
"""

from __future__ import annotations

from typing import Any

from nemo_opdlm.models.config import ModelConfig, RopeScaling

# --- token facts ----------------------------------------------------------------------------------
# Qwen3's tokenizer has 151,669 tokens (ids 0..151668; 151643.. are specials up to </think>) and an
# embedding of 151,936 rows: 151669 is the first row no token maps to, used for [MASK].
QWEN3_MASK_ID = 151669
QWEN3_EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>
# Qwen2.5's tokenizer has 151,665 tokens (specials end at <|file_sep|> = 151664); embedding 152,064.
QWEN25_MASK_ID = 151665
QWEN25_EOS_IDS = (151645, 151643)
# Llama 3.1 uses all 128,256 rows; 128002 is <|reserved_special_token_0|>, never produced by text.
LLAMA31_MASK_ID = 128002
LLAMA31_EOS_IDS = (128009, 128001, 128008)  # <|eot_id|>, <|end_of_text|>, <|eom_id|>

QWEN3_CHAT = {"enable_thinking": False}
"""Qwen3's template variable: the paper's rollouts are plain answers, not <think> traces."""

LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)


def _qwen3(**fields: Any) -> ModelConfig:
    base: dict[str, Any] = dict(family="qwen3", num_query_groups=8, head_dim=128, vocab_size=151936,
                                max_position_embeddings=40960, rotary_base=1_000_000.0, norm_eps=1e-6,
                                qk_layernorm=True, add_qkv_bias=False, params_dtype="bfloat16")
    base.update(fields)
    return ModelConfig(**base)


def qwen3_0_6b(**overrides: Any) -> ModelConfig:
    """Qwen3-0.6B: 28 x 1024, FFN 3072, 16 heads / 8 KV heads of 128, tied embeddings."""
    return _qwen3(num_layers=28, hidden_size=1024, ffn_hidden_size=3072, num_attention_heads=16,
                  tie_word_embeddings=True, **overrides)


def qwen3_1_7b(**overrides: Any) -> ModelConfig:
    """Qwen3-1.7B: 28 x 2048, FFN 6144, 16 heads / 8 KV heads of 128, tied embeddings."""
    return _qwen3(num_layers=28, hidden_size=2048, ffn_hidden_size=6144, num_attention_heads=16,
                  tie_word_embeddings=True, **overrides)


def qwen3_4b(**overrides: Any) -> ModelConfig:
    """Qwen3-4B: 36 x 2560, FFN 9728, 32 heads / 8 KV heads of 128 (4096 > 2560), tied embeddings."""
    return _qwen3(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32,
                  tie_word_embeddings=True, **overrides)


def qwen3_8b(**overrides: Any) -> ModelConfig:
    """Qwen3-8B: 36 x 4096, FFN 12288, 32 heads / 8 KV heads of 128, separate output layer."""
    return _qwen3(num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32,
                  tie_word_embeddings=False, **overrides)


def qwen3_32b(**overrides: Any) -> ModelConfig:
    """Qwen3-32B: 64 x 5120, FFN 25600, 64 heads / 8 KV heads of 128, separate output layer."""
    return _qwen3(num_layers=64, hidden_size=5120, ffn_hidden_size=25600, num_attention_heads=64,
                  tie_word_embeddings=False, **overrides)


def _qwen25(**fields: Any) -> ModelConfig:
    base: dict[str, Any] = dict(family="qwen2", head_dim=None, vocab_size=152064, max_position_embeddings=32768,
                                rotary_base=1_000_000.0, norm_eps=1e-6, qk_layernorm=False, add_qkv_bias=True,
                                tie_word_embeddings=False, params_dtype="bfloat16")
    base.update(fields)
    return ModelConfig(**base)


def qwen25_7b(**overrides: Any) -> ModelConfig:
    """Qwen2.5-7B-Instruct: 28 x 3584, FFN 18944, 28 heads / 4 KV heads of 128, q/k/v biases."""
    return _qwen25(num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28,
                   num_query_groups=4, **overrides)


def qwen25_1_5b(**overrides: Any) -> ModelConfig:
    """Qwen2.5-1.5B-Instruct: 28 x 1536, FFN 8960, 12 heads / 2 KV heads of 128, q/k/v biases, tied
    embeddings, 151,936 rows (the 7B and larger have 152,064: the same 151,665-id tokenizer, more padding)."""
    return _qwen25(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12,
                   num_query_groups=2, vocab_size=151936, tie_word_embeddings=True, **overrides)


def qwen25_32b(**overrides: Any) -> ModelConfig:
    """Qwen2.5-32B-Instruct: 64 x 5120, FFN 27648, 40 heads / 8 KV heads of 128, q/k/v biases."""
    return _qwen25(num_layers=64, hidden_size=5120, ffn_hidden_size=27648, num_attention_heads=40,
                   num_query_groups=8, **overrides)


def _llama31(**fields: Any) -> ModelConfig:
    base: dict[str, Any] = dict(family="llama", num_query_groups=8, head_dim=None, vocab_size=128256,
                                max_position_embeddings=131072, rotary_base=500_000.0, rope_scaling=LLAMA31_ROPE,
                                norm_eps=1e-5, qk_layernorm=False, add_qkv_bias=False, tie_word_embeddings=False,
                                params_dtype="bfloat16")
    base.update(fields)
    return ModelConfig(**base)


def llama31_8b(**overrides: Any) -> ModelConfig:
    """Llama-3.1-8B-Instruct: 32 x 4096, FFN 14336, 32 heads / 8 KV heads of 128, llama3 RoPE x8."""
    return _llama31(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, **overrides)


def llama31_70b(**overrides: Any) -> ModelConfig:
    """Llama-3.1-70B-Instruct: 80 x 8192, FFN 28672, 64 heads / 8 KV heads of 128, llama3 RoPE x8."""
    return _llama31(num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64, **overrides)


SHAPES = {
    "Qwen3-0.6B": qwen3_0_6b, "Qwen3-1.7B": qwen3_1_7b, "Qwen3-4B": qwen3_4b, "Qwen3-8B": qwen3_8b,
    "Qwen3-32B": qwen3_32b, "Qwen2.5-7B-Instruct": qwen25_7b, "Qwen2.5-32B-Instruct": qwen25_32b,
    "Llama-3.1-8B-Instruct": llama31_8b, "Llama-3.1-70B-Instruct": llama31_70b,
}
"""HF model name -> shape function (the default checkpoint directory of each is ``hf/<name>``)."""
