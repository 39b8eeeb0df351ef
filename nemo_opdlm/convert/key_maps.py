"""Hugging Face <-> megatron-core tensor names and layouts, per model family, as data.

One job: say which HF tensors make up each megatron-core parameter, how they are fused, and along
which axis megatron splits the result across tensor-parallel ranks, together with the pure
functions that fuse/split one TP shard. Non-goals: file I/O (``safetensors_io.py``) and walking
models (``hf_to_mcore.py``, ``mcore_to_hf.py``).

megatron-core layouts that the tables encode:

- ``linear_qkv`` interleaves per query group: for each group g, the g-th group's query heads
  (``heads / groups`` of them), then k_g, then v_g; TP rank r holds groups
  ``[r * G/tp, (r + 1) * G/tp)``, still interleaved. The bias (Qwen2) follows the same rows.
- ``linear_fc1`` is ``[gate; up]`` *per TP shard*: rank r holds ``[gate_r; up_r]``.
- Column-parallel weights split rows (axis 0), row-parallel weights split columns (axis 1).
- The embedding and output layer split the *padded* vocabulary by rows; rows at and beyond the
  tokenizer's vocabulary are padding (zero in the weights, masked in the logits).

All three supported families use the same HF names (``model.layers.{i}.self_attn.q_proj`` ...);
they differ in which optional tensors exist (q/k norms for Qwen3, q/k/v biases for Qwen2) and
whether the output layer is tied to the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nemo_opdlm.models.config import ModelConfig

NONE, QKV, GATE_UP = "none", "qkv", "gate_up"




@dataclass(frozen=True)
class Rule:
    """One megatron-core parameter and the HF tensors it is made of."""

    mcore: tuple[str, ...]
    """Local megatron-core state-dict names ({i} = layer): the local-spec name, then aliases
    (Transformer Engine fuses the pre-attention / pre-MLP norms into the next linear)."""
    hf: tuple[str, ...]
    """HF tensor names ({i} = layer), in fusing order."""
    fuse: str = NONE
    """How the HF tensors are fused: 'none', 'qkv' (per-group interleave) or 'gate_up'."""
    tp_axis: Optional[int] = None
    """Axis megatron splits across TP ranks (0 column-parallel / vocab, 1 row-parallel), or None."""
    vocab: bool = False
    """Axis 0 is the padded vocabulary."""
    needs: Optional[str] = None
    """Present only if this ModelConfig attribute is truthy ('untied' = not tie_word_embeddings)."""

    def applies(self, cfg: ModelConfig) -> bool:
        if self.needs is None:
            return True
        if self.needs == "untied":
            return not cfg.tie_word_embeddings
        return bool(getattr(cfg, self.needs))


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

LAYER_RULES: tuple[Rule, ...] = (
    Rule((_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight"),
         (_H + "input_layernorm.weight",)),
    Rule((_L + "self_attention.linear_qkv.weight",),
         (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
         fuse=QKV, tp_axis=0),
    Rule((_L + "self_attention.linear_qkv.bias",),
         (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
         fuse=QKV, tp_axis=0, needs="add_qkv_bias"),
    Rule((_L + "self_attention.q_layernorm.weight",), (_H + "self_attn.q_norm.weight",), needs="qk_layernorm"),
    Rule((_L + "self_attention.k_layernorm.weight",), (_H + "self_attn.k_norm.weight",), needs="qk_layernorm"),
    Rule((_L + "self_attention.linear_proj.weight",), (_H + "self_attn.o_proj.weight",), tp_axis=1),
    Rule((_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight"),
         (_H + "post_attention_layernorm.weight",)),
    Rule((_L + "mlp.linear_fc1.weight",), (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
         fuse=GATE_UP, tp_axis=0),
    Rule((_L + "mlp.linear_fc2.weight",), (_H + "mlp.down_proj.weight",), tp_axis=1),
)

EMBEDDING = Rule(("embedding.word_embeddings.weight",), ("model.embed_tokens.weight",), tp_axis=0, vocab=True)
FINAL_NORM = Rule(("decoder.final_layernorm.weight",), ("model.norm.weight",))
OUTPUT = Rule(("output_layer.weight",), ("lm_head.weight",), tp_axis=0, vocab=True, needs="untied")
# With tied embeddings the last PP stage still holds its own copy of the output weight; it is
# filled from the embedding and never exported.
TIED_OUTPUT = Rule(("output_layer.weight",), ("model.embed_tokens.weight",), tp_axis=0, vocab=True)

# HF tensors that carry no weights (old Llama checkpoints store the RoPE table).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of this architecture with its shape (unpadded vocabulary)."""
    h, d, f, v = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size, cfg.vocab_size
    q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_rows, h),
        "self_attn.k_proj.weight": (kv_rows, h),
        "self_attn.v_proj.weight": (kv_rows, h),
        "self_attn.o_proj.weight": (h, q_rows),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    if cfg.add_qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (q_rows,), "self_attn.k_proj.bias": (kv_rows,),
                          "self_attn.v_proj.bias": (kv_rows,)})
    if cfg.qk_layernorm:
        per_layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def split_layer_name(local_name: str) -> tuple[Optional[int], str]:
    """``decoder.layers.3.mlp.x`` -> (3, ``decoder.layers.{i}.mlp.x``); other names -> (None, name)."""
    prefix = "decoder.layers."
    if not local_name.startswith(prefix):
        return None, local_name
    index, rest = local_name[len(prefix):].split(".", 1)
    return int(index), prefix + "{i}." + rest


def rule_for(template: str, cfg: ModelConfig, *, is_tied_output: bool = False) -> Optional[Rule]:
    """The rule whose megatron name (or alias) is ``template``; None if there is none."""
    if template == "output_layer.weight":
        return TIED_OUTPUT if is_tied_output else OUTPUT
    for rule in LAYER_RULES + (EMBEDDING, FINAL_NORM):
        if template in rule.mcore and rule.applies(cfg):
            return rule
    return None


# ---------------------------------------------------------------------------------------------
# Fusing and splitting one TP shard (pure tensor functions).
# ---------------------------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """megatron's interleaved ``[q_g; k_g; v_g]`` per group from q ``[G*hpg*D, ...]``, k/v ``[G*D, ...]``.

    ``groups`` is the number of query groups in these tensors (G/tp for a TP shard).
    """
    rest = q.shape[1:]
    q = q.reshape(groups, -1, *rest)  # [G, hpg*D, ...]
    k = k.reshape(groups, -1, *rest)  # [G, D, ...]
    v = v.reshape(groups, -1, *rest)  # [G, D, ...]
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # [G*(hpg+2)*D, ...]


def split_qkv(fused: torch.Tensor, groups: int, heads_per_group: int) -> tuple[torch.Tensor, ...]:
    """Inverse of :func:`fuse_qkv`: q ``[G*hpg*D, ...]``, k ``[G*D, ...]``, v ``[G*D, ...]``."""
    rest = fused.shape[1:]
    per_group = fused.reshape(groups, heads_per_group + 2, -1, *rest)  # [G, hpg+2, D, ...]
    q = per_group[:, :heads_per_group].reshape(-1, *rest)
    k = per_group[:, heads_per_group].reshape(-1, *rest)
    v = per_group[:, heads_per_group + 1].reshape(-1, *rest)
    return q, k, v


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``[gate; up]`` for one TP shard: ``[2F/tp, H]``."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fused.chunk(2, dim=0)
    return gate, up


def shard_rows(rule: Rule, cfg: ModelConfig, hf_index: int, tp_rank: int, tp_size: int) -> Optional[tuple[int, int]]:
    """Rows ``[start, stop)`` of HF tensor ``rule.hf[hf_index]`` that TP rank ``tp_rank`` needs.

    None means the whole tensor (replicated, or row-parallel: split along columns after reading).
    For the vocabulary the range is clipped to the real vocabulary (the rest is padding).
    """
    if rule.tp_axis != 0:
        return None
    d = cfg.kv_channels
    if rule.vocab:
        local = cfg.padded_vocab_size(tp_size) // tp_size
        start = tp_rank * local
        return min(start, cfg.vocab_size), min(start + local, cfg.vocab_size)
    if rule.fuse == QKV:
        groups = cfg.num_query_groups // tp_size
        heads = cfg.num_attention_heads // tp_size
        rows = heads * d if hf_index == 0 else groups * d
        return tp_rank * rows, (tp_rank + 1) * rows
    if rule.fuse == GATE_UP:
        rows = cfg.ffn_hidden_size // tp_size
        return tp_rank * rows, (tp_rank + 1) * rows
    raise ValueError(f"no row split for {rule.mcore[0]}")


def to_hf(rule: Rule, cfg: ModelConfig, shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """The HF tensors (in ``rule.hf`` order) from the TP shards of one megatron parameter."""
    tp_size = len(shards)
    if rule.fuse == QKV:
        groups = cfg.num_query_groups // tp_size
        hpg = cfg.num_attention_heads // cfg.num_query_groups
        parts = [split_qkv(s, groups, hpg) for s in shards]
        return [torch.cat([p[j] for p in parts], dim=0) for j in range(3)]
    if rule.fuse == GATE_UP:
        parts = [split_gate_up(s) for s in shards]
        return [torch.cat([p[j] for p in parts], dim=0) for j in range(2)]
    if rule.tp_axis is None:
        return [shards[0]]
    full = shards[0] if tp_size == 1 else torch.cat(shards, dim=rule.tp_axis)
    if rule.vocab:
        full = full[: cfg.vocab_size]
    return [full]
