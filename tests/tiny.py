"""Tiny model configs and training rows shared by the tests (random weights, built in the test)."""

import math
from typing import Any

import torch

from nemo_opdlm.distill import states
from nemo_opdlm.models import grid, masks
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


# --- files a test writes (the tiny recipes read them: ``opdlm train --recipe tiny:... init.teacher_hf=...``)

def hf_config(model: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` of a tiny shape (Qwen3ForCausalLM, transformers-5 spelling)."""
    from nemo_opdlm.convert.hf_config import hf_config_from_model

    cfg = hf_config_from_model(model)
    cfg.update(bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return cfg


def write_hf_model(directory: str, model: "ModelConfig | None" = None, seed: int = 0) -> str:
    """Save a random-weight HF checkpoint of ``model`` (default: the tiny shape) with the task's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_opdlm.eval.synthetic import build_tokenizer

    from nemo_opdlm.recipes.tiny import tiny_shape

    model = model or tiny_shape()
    raw = hf_config(model)
    config = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items() if k != "architectures"})
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def write_prompts(directory: str, num_train: int = 32, seed: int = 0) -> str:
    """Arithmetic prompts (with reference responses) as ``train.jsonl``; returns its path."""
    from nemo_opdlm.eval.synthetic import ArithmeticConfig, write_task

    return write_task(directory, ArithmeticConfig(), num_train=num_train, num_test=4, seed=seed).train


def block_rows(block_grid: str, response_len: int = 12, seed: int = 0) -> dict:
    """Training rows ``[prompt | x0 | xt]`` of four prompts (lengths 3, 5, 6, 8: every P mod 4), on a grid."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([3, 5, 6, 8])
    width = int(lens.max())
    prompt_ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), torch.randint(3, 90, (n,),
                                                                                               generator=g)])
                              for n in lens.tolist()])
    response = torch.randint(3, 90, (4, response_len), generator=g)
    valid = torch.ones(4, response_len, dtype=torch.bool)
    valid[1, response_len - 3:] = False
    step_map = torch.randint(0, 4, (4, response_len), generator=g)
    f = grid.frame_rows(prompt_ids, lens, response, valid, step_map, 4, block_grid, pad_id=0)
    return states.build_states(f.prompt_ids, f.prompt_lens, f.tokens, None, f.valid, block_size=4, steps_per_block=4,
                               mask_token_id=99, eos_ids=[1], generator=g, masking="random", given=f.given)


def random_qkv(meta: torch.Tensor, heads: int = 4, groups: int = 2, dim: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b, s = meta.shape[0], meta.shape[-1]
    return (torch.randn(b, heads, s, dim, generator=g), torch.randn(b, groups, s, dim, generator=g),
            torch.randn(b, groups, s, dim, generator=g))


def written_out_attention(q, k, v, allowed):
    """Attention written out (the local path's math): softmax of masked scores, GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v
