"""Tiny model configs shared by the tests (random weights, built in the test)."""

from nemo_opdlm.models.config import ModelConfig


def tiny_model(**overrides) -> ModelConfig:
    """2 layers, hidden 64, 4 query heads / 2 KV groups, qk-norm: a Qwen3 shape in miniature."""
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=100, qk_layernorm=True, make_vocab_size_divisible_by=8,
                max_position_embeddings=256, rotary_base=10000.0)
    base.update(overrides)
    return ModelConfig(**base)


DECODE_FIELDS = ("mode", "threshold", "steps_per_block", "temperature", "top_k", "top_p", "use_cache",
                 "pad_commit_slots")
DIFFUSION_FIELDS = ("block_size", "mask_token_id", "shift_logits")


def sampler_config(**kw):
    """A ``SamplerConfig`` from flat keywords (decode, diffusion and sampler fields mixed), with the
    rollouts' decoding defaults (dynamic, threshold 0.9, temperature 1) and block 4."""
    from nemo_opdlm.config import RolloutConfig
    from nemo_opdlm.models.config import DiffusionConfig
    from nemo_opdlm.rollout.sampler import SamplerConfig, with_mode

    decode = {k: kw.pop(k) for k in DECODE_FIELDS if k in kw}
    diffusion = {k: kw.pop(k) for k in DIFFUSION_FIELDS if k in kw}
    mode = decode.pop("mode", "dynamic")
    return SamplerConfig(decode=with_mode(RolloutConfig(**decode), mode), diffusion=DiffusionConfig(**diffusion), **kw)
