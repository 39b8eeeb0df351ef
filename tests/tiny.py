"""Tiny model configs shared by the tests (random weights, built in the test)."""

from nemo_opdlm.models.config import ModelConfig


def tiny_model(**overrides) -> ModelConfig:
    """2 layers, hidden 64, 4 query heads / 2 KV groups, qk-norm: a Qwen3 shape in miniature."""
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=100, qk_layernorm=True, make_vocab_size_divisible_by=8,
                max_position_embeddings=256, rotary_base=10000.0)
    base.update(overrides)
    return ModelConfig(**base)
