"""Tiny random Hugging Face models for the converter tests, built and saved with transformers itself.

Each family gets a small config that still exercises its features: Qwen3 with qk-norm, tied
embeddings and a head_dim that is not hidden/heads; Qwen2 with q/k/v biases; Llama with Llama-3.1
RoPE scaling. All use GQA (4 query heads, 2 groups) and 2 layers (so PP=2 and TP=2 both divide).
They are saved with a small ``max_shard_size`` so that the checkpoint has several shards + index.
"""

from __future__ import annotations

import os
from typing import Any

import torch

FAMILIES = ("qwen3", "qwen2", "llama")
VOCAB = 100


def hf_config(family: str, **overrides: Any):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2)
    if family == "qwen3":
        kw = dict(common, head_dim=24, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6)
        kw.update(overrides)
        return Qwen3Config(**kw)
    if family == "qwen2":
        kw = dict(common, tie_word_embeddings=False, rope_theta=1_000_000.0, rms_norm_eps=1e-5)
        kw.update(overrides)
        return Qwen2Config(**kw)
    if family == "llama":
        kw = dict(common, tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                    original_max_position_embeddings=32))
        kw.update(overrides)
        return LlamaConfig(**kw)
    raise ValueError(family)


def hf_model(family: str, seed: int = 0, **overrides: Any):
    """A random-weight transformers model in eval mode (biases and norms randomised too)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.endswith(".bias") else 1.0))
    return model


def save_tokenizer(directory: str, vocab: int = VOCAB) -> None:
    """A word-level tokenizer whose ids are 0..vocab-1 (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def special(word: str) -> AddedToken:
        # whole words only: a plain special "w1" also matched inside "w12", which encoded as [w1, <unk>]
        return AddedToken(word, single_word=True, special=True, normalized=False)

    # the last id is the [MASK] of the tests' students: a special token, never an ordinary word
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=special("w0"), eos_token=special("w2"),
                            bos_token=special("w1"), mask_token=special(f"w{vocab - 1}")).save_pretrained(directory)


def save_hf(family: str, directory: str, seed: int = 0, shard: str = "30KB", dtype=torch.float32, **overrides: Any):
    """Save a tiny model (several shards + index) and a tokenizer; return the in-memory model."""
    model = hf_model(family, seed, **overrides)
    model.to(dtype).save_pretrained(directory, max_shard_size=shard)
    save_tokenizer(directory, model.config.vocab_size)
    return model.float()


def read_hf_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def assert_same_tensors(a_dir: str, b_dir: str) -> None:
    """Every tensor bit-identical (same names, dtypes, shapes, bytes)."""
    a, b = read_hf_tensors(a_dir), read_hf_tensors(b_dir)
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.uint8) if a[name].dtype == torch.bfloat16 else a[name],
                           b[name].view(torch.uint8) if b[name].dtype == torch.bfloat16 else b[name]), name


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # [B, S, V]


def student_from_hf(hf_dir, diffusion, parallel, *, teacher=None, **overrides):
    """Trainable student chunks initialised from ``hf_dir`` (the teacher's weights, unchanged), as
    the trainer builds them from ``init.student_hf``; with ``teacher`` given the vocabularies must
    agree (they share one tokenizer)."""
    from nemo_opdlm.convert import hf_config as hfc
    from nemo_opdlm.convert.hf_to_mcore import load_hf_weights, without_random_init
    from nemo_opdlm.models.student import build_student

    cfg = hfc.model_config_from_hf(hfc.read_hf_config(hf_dir), **overrides)
    if teacher is not None:
        hfc.check_same_vocab(teacher, cfg)
    chunks = build_student(without_random_init(cfg), diffusion, parallel)
    load_hf_weights(chunks, hf_dir, cfg)
    return cfg, chunks
