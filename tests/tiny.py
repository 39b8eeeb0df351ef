"""Tiny model configs shared by the tests (random weights, built in the test)."""

import torch

from nemo_opdlm.models import masks
from nemo_opdlm.models.config import ModelConfig


def tiny_model(**overrides) -> ModelConfig:
    """The tiny recipes' Qwen3 shape in miniature (``recipes/tiny.tiny_shape``: 2 layers x 64, 4 query
    heads / 2 KV groups, qk-norm), with a 100-row untied vocabulary and the automatic back ends."""
    from nemo_opdlm.recipes.tiny import tiny_shape

    base = dict(vocab_size=100, tie_word_embeddings=False, attention_backend="auto", linear_impl="auto")
    return tiny_shape(**dict(base, **overrides))


DECODE_FIELDS = ("mode", "threshold", "steps_per_block", "temperature", "top_k", "top_p", "use_cache",
                 "pad_commit_slots")
DIFFUSION_FIELDS = ("block_size", "mask_token_id", "shift_logits", "block_grid")


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


def sequence_layout(
    batch: int, seq_len: int, block_size: int, device: torch.device | str = "cpu"
) -> "masks.RowLayout":
    """A prompt-free, unpadded row of ``seq_len`` clean tokens (block size 1 = causal)."""
    valid = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    lens = torch.zeros(batch, dtype=torch.long, device=device)
    return masks.build_layout(lens, 0, valid, block_size, with_xt=False)


def reference_allowed(q_meta: torch.Tensor, k_meta: torch.Tensor) -> torch.Tensor:
    """Loop-by-loop statement of the rule in the module docstring (slow: the reference the vectorised rule is tested against)."""
    batch, _, sq = q_meta.shape
    sk = k_meta.shape[-1]
    out = torch.zeros(batch, sq, sk, dtype=torch.bool)
    for b in range(batch):
        for i in range(sq):
            qb, qk = int(q_meta[b, 0, i]), int(q_meta[b, 1, i])
            for j in range(sk):
                kb, kk = int(k_meta[b, 0, j]), int(k_meta[b, 1, j])
                if j == i + sk - sq:
                    ok = True
                elif qk == masks.PAD:
                    ok = False
                elif kk == masks.CLEAN:
                    ok = kb < qb or (kb == qb and qk == masks.CLEAN)
                elif kk == masks.NOISY:
                    ok = qk == masks.NOISY and kb == qb
                else:
                    ok = False
                out[b, i, j] = ok
    return out
