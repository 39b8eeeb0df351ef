"""Block-diffusion language model exported by nemo_opdlm: self-contained ``trust_remote_code`` file.

One job: run an exported OPDLM student in plain ``torch`` + ``transformers`` (this file imports
nothing from nemo_opdlm) and decode with it. The weights keep the source architecture's names
(Qwen3 / Qwen2 / Llama: ``model.layers.{i}.self_attn.q_proj.weight`` ...), so the model is the
source decoder with one change: attention follows a block-diffusion mask instead of a causal one.

Token metadata (the same convention as the training code): every token carries a block id and a
kind, stacked as ``token_meta[:, 0]`` / ``token_meta[:, 1]`` (``[B, 2, S]`` int64).

- kind ``PAD`` (0) is never a key and sees only itself, ``CLEAN`` (1) is a prompt or
  committed token, ``NOISY`` (2) is a token of the block being denoised (``xt``).
- Response blocks count 0, 1, ... from the first response token; prompt blocks count -1, -2, ...
  backwards from the prompt's end (a left-padded prompt's blocks are aligned to its end).
- A non-padding query q may attend to key k if k is clean and (block(k) < block(q), or same
  block and q is clean), or k is noisy, q is noisy and they share a block; every token sees
  itself. Clean tokens are therefore block-causal, and an ``xt`` block sees the prompt, earlier
  clean blocks and itself.

Usage::

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)           # static
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64, threshold=0.9)

``generate`` decodes block by block: each block starts as ``[MASK]`` tokens and is unmasked over
``steps_per_block`` rounds; confidence is the probability of the chosen token under the softmax
of the raw logits. Static decoding unmasks a fixed count per round (most confident first);
threshold decoding unmasks every masked position whose confidence is strictly above the
threshold, and at least the scheduled count.

Block grid (``config.block_grid``, the grid the student was trained on; ``generate`` decodes on it
and refuses another):

- ``response``: blocks start at the response's first token (prompt blocks counted back from the
  prompt's end, as above).
- ``absolute`` (SGLang, lmdeploy and JetEngine for SDAR models): blocks are cut from position 0. A
  prompt of ``P`` tokens has a *head* of ``r = P mod block_size`` tokens: its first ``P - r``
  tokens are prefilled, and the first denoising block holds the head (given: never masked, never
  chosen, noisy-kind so that it attends both ways with the masks of its block) and
  ``block_size - r`` masks. ``generate`` works in a *frame*: each row's prompt rolled right by its
  head, so that the aligned prefix is the prompt and the head is the first tokens of the response;
  every other rule above is unchanged, and with no head the frame is the row itself.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutput

PAD, CLEAN, NOISY = 0, 1, 2
GRIDS = ("response", "absolute")
"""The block grids a student can be trained on (``config.block_grid``; see the module docstring)."""
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


class OPDLMConfig(PretrainedConfig):
    """Architecture + diffusion settings of an exported student (written by nemo_opdlm's exporter)."""

    model_type = "opdlm_block_diffusion"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 8,
        head_dim: Optional[int] = None,
        max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 1_000_000.0,
        rope_llama3: Optional[dict] = None,
        qk_norm: bool = False,
        qkv_bias: bool = False,
        tie_word_embeddings: bool = False,
        mask_token_id: Optional[int] = None,
        block_size: int = 4,
        shift_logits: bool = False,
        block_grid: str = "response",
        attention_kind: str = "block_causal",
        source_architecture: Optional[str] = None,
        source_model_type: Optional[str] = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_llama3 = rope_llama3
        self.qk_norm = qk_norm
        self.qkv_bias = qkv_bias
        self.mask_token_id = mask_token_id
        self.block_size = block_size
        self.shift_logits = shift_logits
        self.block_grid = check_grid(block_grid)
        self.attention_kind = attention_kind
        self.source_architecture = source_architecture
        self.source_model_type = source_model_type
        if attention_kind != "block_causal":
            raise ValueError(f"attention_kind {attention_kind!r} is not supported (only 'block_causal')")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.tie_word_embeddings = tie_word_embeddings


def check_grid(grid: Optional[str]) -> str:
    """``grid`` if it is a known block grid; None (a config written before grids existed) reads as
    'response', the only grid there was."""
    grid = "response" if grid is None else grid
    if grid not in GRIDS:
        raise ValueError(f"block_grid must be one of {GRIDS}, got {grid!r}")
    return grid


# ---------------------------------------------------------------------------------------------
# Masks and layouts (the rule of the training code, restated).
# ---------------------------------------------------------------------------------------------


def allowed(q_meta: torch.Tensor, k_meta: torch.Tensor) -> torch.Tensor:
    """Dense permission ``[B, Sq, Sk]``; the queries are the last ``Sq`` of the ``Sk`` keys."""
    q_block, q_kind = q_meta[:, 0, :, None], q_meta[:, 1, :, None]  # [B, Sq, 1]
    k_block, k_kind = k_meta[:, 0, None, :], k_meta[:, 1, None, :]  # [B, 1, Sk]
    same_block_ok = (k_block == q_block) & (q_kind == CLEAN)
    clean_ok = (k_kind == CLEAN) & (q_kind != PAD) & ((k_block < q_block) | same_block_ok)
    noisy_ok = (k_kind == NOISY) & (q_kind == NOISY) & (k_block == q_block)
    sq, sk = q_meta.shape[-1], k_meta.shape[-1]
    cols = torch.arange(sk, device=q_meta.device)[None, :]
    rows = torch.arange(sq, device=q_meta.device)[:, None] + (sk - sq)
    return clean_ok | noisy_ok | (cols == rows)[None]


def prompt_layout(attention_mask: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Metadata ``[B, 2, P]`` and positions ``[B, P]`` of left-padded prompts (1 = real token)."""
    batch, width = attention_mask.shape
    device = attention_mask.device
    lens = attention_mask.long().sum(dim=1)  # [B]
    cols = torch.arange(width, device=device)
    block = (-((width - cols + block_size - 1) // block_size)).expand(batch, -1)  # [B, P]
    real = cols[None, :] >= (width - lens)[:, None]  # [B, P]
    kind = torch.where(real, CLEAN, PAD)
    pos = (cols[None, :] - (width - lens)[:, None]).clamp(min=0)
    return torch.stack([block, kind], dim=1).long(), pos.long()


def response_layout(prompt_lens: torch.Tensor, start: int, length: int, block_size: int,
                    kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Metadata ``[B, 2, length]`` and positions of response tokens ``[start, start + length)``."""
    idx = torch.arange(start, start + length, device=prompt_lens.device)
    block = (idx // block_size).expand(prompt_lens.shape[0], -1)
    kinds = torch.full_like(block, kind)
    return torch.stack([block, kinds], dim=1).long(), (prompt_lens[:, None] + idx[None, :]).long()


def head_lengths(prompt_lens: torch.Tensor, block_size: int, grid: str) -> torch.Tensor:
    """``[B]``: each row's head, the prompt tokens that share the first denoising block with the
    response (``P mod block_size`` on the absolute grid, 0 on the response grid)."""
    if check_grid(grid) == "response" or block_size == 1:
        return torch.zeros_like(prompt_lens)
    return prompt_lens % block_size


def roll_right(x: torch.Tensor, shift: torch.Tensor, fill) -> torch.Tensor:
    """``x [B, S, ...]`` with row ``b`` moved ``shift[b]`` columns right (``fill`` enters on the left)."""
    cols = torch.arange(x.shape[1], device=x.device)[None, :] - shift[:, None]  # [B, S]
    return _gather_cols(x, cols, fill)


def roll_left(x: torch.Tensor, shift: torch.Tensor, fill) -> torch.Tensor:
    """``x [B, S, ...]`` with row ``b`` moved ``shift[b]`` columns left (``fill`` enters on the right)."""
    cols = torch.arange(x.shape[1], device=x.device)[None, :] + shift[:, None]  # [B, S]
    return _gather_cols(x, cols, fill)


def _gather_cols(x: torch.Tensor, cols: torch.Tensor, fill) -> torch.Tensor:
    """``out[b, j] = x[b, cols[b, j]]``, ``fill`` where ``cols`` falls outside ``[0, S)``."""
    inside = (cols >= 0) & (cols < x.shape[1])  # [B, S]
    trailing = [1] * (x.dim() - 2)
    index = cols.clamp(0, x.shape[1] - 1).view(*cols.shape, *trailing).expand_as(x)
    fill_value = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    return torch.where(inside.view(*cols.shape, *trailing), x.gather(1, index), fill_value)


def frame_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, head: torch.Tensor,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts ``[B, P]`` in the frame: ``(prefix ids [B, P], prefix mask [B, P],
    head ids [B, H])``, the block-aligned prefixes still right-aligned and each row's head tokens
    in its first ``head[b]`` columns of ``H = max(head)`` (padding after)."""
    width = int(head.max()) if head.numel() else 0
    if width == 0:
        return input_ids, attention_mask, input_ids.new_empty(input_ids.shape[0], 0)
    extra = input_ids.new_full((input_ids.shape[0], width), pad_id)
    ids = roll_right(torch.cat([input_ids, extra], dim=1), head, pad_id)  # [B, P + H]
    mask = roll_right(torch.cat([attention_mask, torch.zeros_like(extra)], dim=1), head, 0)
    cols = input_ids.shape[1]
    return ids[:, :cols], mask[:, :cols], ids[:, cols:]


# ---------------------------------------------------------------------------------------------
# The decoder.
# ---------------------------------------------------------------------------------------------


class OPDLMRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: OPDLMConfig) -> torch.Tensor:
    """RoPE inverse frequencies ``[D/2]``, with Llama-3.1 scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_llama3
    if not scaling:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class OPDLMAttention(nn.Module):
    def __init__(self, config: OPDLMConfig) -> None:
        super().__init__()
        self.heads, self.groups, self.dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.groups * self.dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.groups * self.dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.dim, h, bias=False)
        if config.qk_norm:
            self.q_norm = OPDLMRMSNorm(self.dim, config.rms_norm_eps)
            self.k_norm = OPDLMRMSNorm(self.dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                past: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """x ``[B, S, H]``, cos/sin ``[B, S, D]``, mask ``[B, S, S_past + S]`` -> (out, (k, v))."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.dim)  # [B, S, nh, D]
        k = self.k_proj(x).view(b, s, self.groups, self.dim)  # [B, S, G, D]
        v = self.v_proj(x).view(b, s, self.groups, self.dim).transpose(1, 2)  # [B, G, S, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # [B, 1, S, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # [B, G, Sk, D]
        rep = self.heads // self.groups
        kr = k.repeat_interleave(rep, dim=1) if rep > 1 else k  # [B, nh, Sk, D]
        vr = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask[:, None])  # [B, nh, S, D]
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.dim)
        return self.o_proj(out), (k, v)


class OPDLMMLP(nn.Module):
    def __init__(self, config: OPDLMConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OPDLMDecoderLayer(nn.Module):
    def __init__(self, config: OPDLMConfig) -> None:
        super().__init__()
        self.input_layernorm = OPDLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = OPDLMAttention(config)
        self.post_attention_layernorm = OPDLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = OPDLMMLP(config)

    def forward(self, x, cos, sin, mask, past=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class OPDLMPreTrainedModel(PreTrainedModel):
    config_class = OPDLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["OPDLMDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, OPDLMRMSNorm):
            nn.init.ones_(module.weight)


class OPDLMModel(OPDLMPreTrainedModel):
    def __init__(self, config: OPDLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OPDLMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = OPDLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_meta: torch.Tensor,
                past_key_values: Optional[list] = None, past_meta: Optional[torch.Tensor] = None):
        """Hidden states ``[B, S, H]`` and per-layer (k, v) of this call (prefixed by the past)."""
        x = self.embed_tokens(input_ids)  # [B, S, H]
        k_meta = token_meta if past_meta is None else torch.cat([past_meta, token_meta], dim=-1)
        mask = allowed(token_meta, k_meta)  # [B, S, Sk]
        # Recomputed per call (D/2 numbers): a buffer would be left uninitialised by meta-device loading.
        inv_freq = rope_inv_freq(self.config).to(x.device)  # [D/2]
        angles = position_ids.float()[..., None] * inv_freq  # [B, S, D/2]
        angles = torch.cat([angles, angles], dim=-1)  # [B, S, D]
        cos, sin = angles.cos(), angles.sin()
        present = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, None if past_key_values is None else past_key_values[i])
            present.append(kv)
        return self.norm(x), present


class OPDLMBlockDiffusionLM(OPDLMPreTrainedModel, GenerationMixin):
    """The exported student: ``forward`` gives logits under block-diffusion metadata; ``generate``
    decodes. ``GenerationMixin`` only makes ``transformers`` load ``generation_config.json`` into
    ``self.generation_config``: ``generate`` is this class's own."""

    # transformers 5 maps tied targets to sources; 4.x lists the tied names.
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if _TRANSFORMERS_MAJOR >= 5 else ["lm_head.weight"]
    )

    def __init__(self, config: OPDLMConfig) -> None:
        super().__init__(config)
        self.model = OPDLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        token_meta: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> CausalLMOutput:
        """Logits ``[B, S, V]`` under block-diffusion metadata: the prediction of the token *at* each
        position, or with ``config.shift_logits`` of the token *after* it (``generate`` then reads a
        block's first token from the clean token before the block).

        Args:
            input_ids: ``[B, S]``.
            position_ids: ``[B, S]`` RoPE positions (xt reuses x0's).
            token_meta: ``[B, 2, S]`` block ids and kinds (see the module docstring; build a
                left-padded prompt's with ``prompt_layout``, a response block's with
                ``response_layout``).

        There is no default layout: a call without ``token_meta`` is what a left-to-right
        log-likelihood scorer makes (``model(ids).logits``, e.g. lm-eval's ``hf`` model on a
        multiple-choice task), and this model has no such likelihood (a clean token sees its whole
        block), so the call is refused instead of returning numbers that look like one.
        """
        unknown = sorted(k for k in kwargs if k not in _FORWARD_IGNORED)
        if kwargs.get("labels") is not None or unknown:
            raise TypeError(f"OPDLMBlockDiffusionLM.forward does not take {unknown or ['labels']}: " + _NO_LIKELIHOOD)
        if token_meta is None or position_ids is None:
            raise ValueError(_NO_LIKELIHOOD)
        hidden, _ = self.model(input_ids, position_ids, token_meta)
        return CausalLMOutput(logits=self.lm_head(hidden))

    def _logits_with_cache(self, input_ids, position_ids, token_meta, cache):
        """Logits of new tokens given a cache ``{"kv": [...], "meta": [B, 2, Sc]}`` of clean tokens."""
        hidden, present = self.model(input_ids, position_ids, token_meta,
                                     past_key_values=cache.get("kv"), past_meta=cache.get("meta"))
        return self.lm_head(hidden), present

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        generation_config: Optional[GenerationConfig] = None,
        stopping_criteria: Optional[Any] = None,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = False,
        **kwargs,
    ):
        """Block-diffusion decoding of prompts ``input_ids [B, P]`` (padded on either side).

        Settings come, as in ``transformers``, from ``generation_config`` (default: the model's,
        read from ``generation_config.json``), updated by keyword arguments:

        - the block decoder's own: ``block_size``, ``steps_per_block`` (rounds per block, default
          ``block_size``: one token per round), ``threshold`` (None: static decoding, the
          scheduled count per round, most confident first, ties to the left; a float: every
          masked position whose confidence is strictly above it, and at least the scheduled
          count), ``mask_token_id``, ``suppress_mask_token`` (default True: [MASK] is never
          chosen), ``block_grid`` (only the grid of ``config.block_grid`` is accepted: the
          student was trained on it);
        - the standard ones it honours: ``max_new_tokens`` / ``max_length`` (an explicit argument
          wins over the config; ``max_new_tokens`` over ``max_length``), ``do_sample`` with
          ``temperature`` / ``top_k`` / ``top_p`` (``do_sample=False``: greedy, and the others
          unused), ``eos_token_id``, ``pad_token_id``, ``num_return_sequences`` (sampling only),
          ``return_dict_in_generate`` with ``output_scores`` / ``output_logits`` (one ``[B, V]``
          tensor per new token: the scores it was chosen from, and the raw logits, at the round
          it was unmasked), ``stopping_criteria`` (called on every new token's prefix once its
          block is decoded), ``use_cache`` (accepted; the prompt and committed blocks are always
          cached), ``token_type_ids`` (one segment only: some tokenizers return them);
        - anything else (beam search, penalties, processors, ...) is refused by name.

        Confidence is the probability of the chosen token under the softmax of the raw logits.
        Padding may be on either side (the rows are re-padded on the left internally). A row
        finishes with the block in which it emits an EOS or meets a stopping criterion; its
        tokens after that are ``pad_token_id`` (default: the first EOS id, else 0).

        Returns ``[B * num_return_sequences, P + L]`` ids (the prompts as given, then at most
        ``max_new_tokens`` new ones), or with ``return_dict_in_generate`` (or the older
        ``return_dict``) an output with ``sequences``, ``step_map`` (``[B, L]``: the round within
        its block at which each token was unmasked; -1 where nothing was decoded) and, when asked,
        ``scores`` and ``logits``.

        With ``config.shift_logits`` position ``j`` of a block is predicted by the logits at
        ``j - 1``, and the block's first position by the last token before the block (the
        prompt's last token, or the previous block's last token when that block is committed).

        On the absolute grid (``config.block_grid``) a row's first block holds its prompt's last
        ``P mod block_size`` tokens and the first response tokens (module docstring); the rounds,
        ``step_map``, scores, EOS and stopping criteria count response tokens only, and
        ``max_new_tokens`` counts response tokens.
        """
        segments = kwargs.pop("token_type_ids", None)  # some tokenizers return them; one segment means nothing
        if segments is not None and bool(segments.any()):
            raise ValueError("token_type_ids with more than one segment: this decoder has no segment embeddings")
        s = _resolve_settings(self.config, generation_config or self.generation_config, kwargs, input_ids.shape[1])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if s.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(s.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(s.num_return_sequences, dim=0)
        left_ids, left_mask = left_aligned(input_ids, attention_mask)
        tokens, step_map, scores, logits = self._decode(left_ids, left_mask, s, generator, input_ids, stopping_criteria)
        tokens, step_map = tokens[:, :s.max_new_tokens], step_map[:, :s.max_new_tokens]
        sequences = torch.cat([input_ids, tokens], dim=1)
        if not (s.return_dict_in_generate or return_dict):
            return sequences
        out = GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(scores[:, j] for j in range(tokens.shape[1])) if s.output_scores else None,
            logits=tuple(logits[:, j] for j in range(tokens.shape[1])) if s.output_logits else None)
        out["step_map"] = step_map
        return out

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, s: "_Settings",
                generator: Optional[torch.Generator], prompts: torch.Tensor, criteria: Optional[Any]):
        """Left-padded prompts -> (tokens ``[B, L]``, step_map, scores and logits ``[B, L, V]`` or None),
        per response token; ``prompts`` as given (for the stopping criteria).

        Works in the frame of ``s.block_grid`` (module docstring): the aligned prefixes are
        prefilled, the heads sit in the first block as given tokens, and the results are moved back
        to response positions at the end (on the response grid every head is 0 and nothing moves)."""
        bs, steps, mask_id, pad = s.block_size, s.steps_per_block, s.mask_token_id, s.pad_token_id
        batch, _ = input_ids.shape
        device = input_ids.device
        prompt_lens = attention_mask.long().sum(dim=1)  # [B]
        head = head_lengths(prompt_lens, bs, s.block_grid)  # [B]
        prefix_ids, prefix_mask, head_ids = frame_prompts(input_ids, attention_mask, head, pad)
        prefix_lens = prompt_lens - head  # [B] multiples of bs on the absolute grid
        prompt_meta, prompt_pos = prompt_layout(prefix_mask, bs)
        n_blocks = -(-(int(head.max()) + s.max_new_tokens) // bs)  # rows with shorter heads discard their tail
        width = n_blocks * bs
        tokens = torch.full((batch, width), pad, dtype=torch.long, device=device)  # framed
        step_map = torch.full_like(tokens, -1)
        keep = s.output_scores or s.output_logits
        vocab = self.config.vocab_size
        scores = torch.zeros(batch, width, vocab, device=device) if s.output_scores else None
        raw_logits = torch.zeros(batch, width, vocab, device=device) if s.output_logits else None
        done_at = torch.full((batch,), width, dtype=torch.long, device=device)  # [B] first stop, response positions
        active = done_at == width
        shift = bool(getattr(self.config, "shift_logits", False))
        if shift and int(prompt_lens.min()) < 1:
            raise ValueError("a shifted model needs a non-empty prompt in every row")
        logits, kv = self._logits_with_cache(prefix_ids, prompt_pos, prompt_meta, {})
        first = logits[:, -1:]  # [B, 1, V] shifted: the prediction of the next block's first token
        cache = {"kv": kv, "meta": prompt_meta}
        cols_in_block = torch.arange(bs, device=device)[None, :]
        given = cols_in_block < head[:, None]  # [B, bs] the heads (first block only)
        head_block = torch.cat([head_ids, head_ids.new_full((batch, bs - head_ids.shape[1]), pad)], dim=1)
        for b in range(n_blocks):
            cols = slice(b * bs, (b + 1) * bs)
            noisy_meta, pos = response_layout(prefix_lens, b * bs, bs, bs, NOISY)
            x = torch.full((batch, bs), mask_id, dtype=torch.long, device=device)  # [B, bs]
            to_decode = torch.ones_like(given) if b > 0 else ~given  # [B, bs]
            if b == 0:
                x = torch.where(given, head_block, x)
            st = torch.full_like(x, -1)  # [B, bs] round of unmasking, -1 = still masked (or given)
            for rnd, count in enumerate(_schedule(bs, steps)):
                logits, _ = self._logits_with_cache(x, pos, noisy_meta, cache)  # [B, bs, V]
                if shift:
                    logits = torch.cat([first, logits[:, :-1]], dim=1)  # [B, bs, V] position j from j - 1
                chosen, confidence, processed = _choose(logits, s.temperature, s.top_k, s.top_p, generator,
                                                        mask_id if s.suppress_mask_token else None)
                pick = _select(confidence, to_decode & (st < 0), count, s.threshold)  # [B, bs]
                x = torch.where(pick, chosen, x)
                st = torch.where(pick, rnd, st)
                if keep:
                    rows = pick & active[:, None]  # [B, bs]
                    if scores is not None:
                        scores[:, cols][rows] = processed[rows]
                    if raw_logits is not None:
                        raw_logits[:, cols][rows] = logits.float()[rows]
                if not bool((to_decode & (st < 0))[active].any()):
                    break  # static decoding ends here too once a head leaves fewer masks than the schedule
            tokens[active, cols] = x[active]
            step_map[active, cols] = st[active]
            lo = (b * bs - head).clamp(min=0)  # [B] the response positions this block decoded
            hi = ((b + 1) * bs - head).clamp(max=s.max_new_tokens)
            done_at = _stops(roll_left(tokens, head, pad), done_at, prompts, s, criteria, lo, hi)
            active = done_at == width
            if b == n_blocks - 1 or not bool(active.any()):
                break
            clean_meta, _ = response_layout(prefix_lens, b * bs, bs, bs, CLEAN)
            logits, kv = self._logits_with_cache(x, pos, clean_meta, cache)
            first = logits[:, -1:]  # [B, 1, V]
            cache = {"kv": kv, "meta": torch.cat([cache["meta"], clean_meta], dim=-1)}
        tokens, step_map = roll_left(tokens, head, pad), roll_left(step_map, head, -1)
        scores = None if scores is None else roll_left(scores, head, 0.0)
        raw_logits = None if raw_logits is None else roll_left(raw_logits, head, 0.0)
        return _pad_after(tokens, done_at, pad), step_map, scores, raw_logits


_NO_LIKELIHOOD = (
    "this block-diffusion model has no left-to-right log-likelihood: a call without token_meta and "
    "position_ids (as a log-likelihood scorer such as lm-eval's 'hf' model on multiple-choice or perplexity tasks "
    "makes) would read block-causal logits as next-token ones. Score it with generation (model.generate, or "
    "generate_until tasks: `opdlm lm-eval --model opdlm ...`), or pass token_meta and position_ids "
    "(prompt_layout / response_layout in modeling_opdlm.py)")
_FORWARD_IGNORED = ("return_dict", "use_cache", "output_attentions", "output_hidden_states")

OWN_GENERATE_ARGS = ("block_size", "steps_per_block", "threshold", "mask_token_id", "suppress_mask_token", "block_grid")
"""The block decoder's settings (keyword arguments or ``generation_config.json`` fields)."""
HONOURED = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
            "pad_token_id", "bos_token_id", "num_return_sequences", "return_dict_in_generate", "output_scores",
            "output_logits", "use_cache")
"""The standard ``GenerationConfig`` fields ``generate`` honours (``bos_token_id``: informational)."""
HF_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
               "num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False,
               "output_logits": False}
"""transformers' values for fields a config leaves unset (None in transformers 5)."""
NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "repetition_penalty": 1.0, "length_penalty": 1.0,
           "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
           "diversity_penalty": 0.0, "min_length": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
           "guidance_scale": 1.0}
"""Values of the fields ``generate`` does not implement that change nothing (a config may spell them out)."""


class _Settings:
    """Everything one ``generate`` call decodes with, resolved and checked."""

    def __init__(self, **fields) -> None:
        self.__dict__.update(fields)


def _resolve_settings(config: OPDLMConfig, generation_config: Optional[GenerationConfig], kwargs: dict,
                      prompt_width: int) -> _Settings:
    """Merge the model config, ``generation_config`` and the call's keyword arguments (in that
    order of precedence, lowest first), and refuse what the block decoder cannot honour, by name."""
    unknown = sorted(k for k in kwargs if k not in OWN_GENERATE_ARGS and k not in HONOURED)
    if unknown:
        raise TypeError(f"generate() got arguments the block-diffusion decoder does not support: {unknown}; it takes "
                        f"{', '.join(OWN_GENERATE_ARGS + HONOURED)}, attention_mask, generation_config, "
                        "stopping_criteria and generator")
    gen = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    baseline = GenerationConfig().to_dict()
    unsupported = sorted(
        k for k, v in gen.to_dict().items()
        if not k.startswith("_") and k != "transformers_version" and k not in HONOURED and k not in OWN_GENERATE_ARGS
        and v not in (None, False, baseline.get(k, None), NEUTRAL.get(k, None)))
    if unsupported:
        raise ValueError(f"generation_config sets fields the block-diffusion decoder does not support: {unsupported} "
                         f"(it honours {', '.join(HONOURED)} and its own {', '.join(OWN_GENERATE_ARGS)})")

    def pick(name: str, default=None):
        if name in kwargs:
            return kwargs[name]
        value = getattr(gen, name, None)
        if value is None:
            value = getattr(config, name, None) if name in OWN_GENERATE_ARGS or name.endswith("token_id") else None
        return HF_DEFAULTS.get(name, default) if value is None else value

    block_size = int(pick("block_size", 4))
    steps = int(pick("steps_per_block") or block_size)
    if not 1 <= steps <= block_size:
        raise ValueError(f"steps_per_block must be in [1, block_size={block_size}], got {steps}")
    mask_id = pick("mask_token_id")
    if mask_id is None:
        raise ValueError("no mask_token_id in the config: pass mask_token_id")
    if "max_new_tokens" in kwargs or ("max_length" not in kwargs and gen.max_new_tokens is not None):
        new = pick("max_new_tokens")
    else:
        new = int(pick("max_length")) - prompt_width
    if new is None or int(new) < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={new} (max_length counts the prompt's {prompt_width} "
                         "tokens); pass max_new_tokens")
    do_sample = bool(pick("do_sample"))
    temperature = float(pick("temperature"))
    if do_sample and temperature <= 0:
        raise ValueError(f"do_sample=True needs temperature > 0, got {temperature}; use do_sample=False for greedy")
    n_ret = int(pick("num_return_sequences"))
    if n_ret > 1 and not do_sample:
        raise ValueError(f"num_return_sequences={n_ret} needs do_sample=True: greedy decoding returns one sequence")
    threshold = pick("threshold")
    trained = check_grid(getattr(config, "block_grid", None))
    grid = pick("block_grid") or trained
    if grid != trained:
        raise ValueError(f"block_grid={grid!r} was asked of generate, but this model was trained on the {trained!r} "
                         f"block grid (config.json block_grid={trained!r}), and decoding on another grid feeds it "
                         f"states it never saw: leave block_grid out (or pass {trained!r})")
    eos = _as_list(pick("eos_token_id"))
    pad = pick("pad_token_id")
    return _Settings(
        block_size=block_size, steps_per_block=steps, mask_token_id=int(mask_id), block_grid=grid,
        threshold=None if threshold is None else float(threshold),
        suppress_mask_token=bool(pick("suppress_mask_token", True)), max_new_tokens=int(new),
        temperature=temperature if do_sample else 0.0, top_k=int(pick("top_k")) if do_sample else 0,
        top_p=float(pick("top_p")) if do_sample else 1.0, num_return_sequences=n_ret, eos_token_ids=eos,
        pad_token_id=int(pad) if pad is not None else (eos[0] if eos else 0),
        return_dict_in_generate=bool(pick("return_dict_in_generate")), output_scores=bool(pick("output_scores")),
        output_logits=bool(pick("output_logits")))


def left_aligned(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows re-padded on the left (real tokens kept in order): the decoder's layout, whatever side
    the tokenizer padded on. ``[B, P]`` each."""
    real = attention_mask.bool()
    order = torch.argsort(real.int(), dim=1, stable=True)  # padding first, then the real tokens in order
    return input_ids.gather(1, order), real.gather(1, order).long()


def _pad_after(tokens: torch.Tensor, done_at: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``tokens [B, L]`` with every position after a row's ``done_at`` set to ``pad_id``."""
    cols = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
    return tokens.masked_fill(cols > done_at[:, None], pad_id)


def _stops(tokens: torch.Tensor, done_at: torch.Tensor, prompts: torch.Tensor, s: "_Settings",
           criteria: Optional[Any], lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``done_at [B]`` updated with each row's new response positions ``[lo[b], hi[b])``: a row stops
    at its first EOS, or at the first token whose prefix meets a stopping criterion (called on
    ``[prompts | tokens up to j]``, as after each step of AR decoding; a criterion may answer per
    row or for the batch). The ranges differ per row only on the absolute grid (its heads shift
    where a block's response tokens begin)."""
    eos = torch.tensor(s.eos_token_ids, dtype=torch.long, device=tokens.device)
    open_rows = tokens.shape[1]
    for j in range(int(lo.min()), int(hi.max())):
        running = done_at == open_rows
        if not bool(running.any()):
            break
        new = (lo <= j) & (j < hi)  # [B]
        hit = torch.isin(tokens[:, j], eos)
        if criteria is not None:
            prefix = torch.cat([prompts, _pad_after(tokens[:, :j + 1], done_at, s.pad_token_id)], dim=1)
            hit |= torch.as_tensor(criteria(prefix, None), device=tokens.device).bool().expand(tokens.shape[0])
        done_at = torch.where(running & new & hit, j, done_at)
    return done_at


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def _schedule(block_size: int, steps: int) -> list[int]:
    """Tokens to unmask per round: ``block_size`` split as evenly as possible, earlier rounds first."""
    base, extra = divmod(block_size, steps)
    return [base + (1 if r < extra else 0) for r in range(steps)]


def _choose(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: Optional[torch.Generator],
            suppress_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen tokens ``[B, n]``, their confidence under the softmax of the raw logits, and the
    scores ``[B, n, V]`` they were chosen from (greedy: the logits with [MASK] suppressed; sampling:
    the log-probabilities after temperature, top-k and top-p)."""
    finfo = torch.finfo(torch.float32)
    raw = torch.nan_to_num(logits.float(), nan=finfo.min, posinf=finfo.max, neginf=finfo.min)  # [B, n, V]
    pickable = raw
    if suppress_id is not None:
        pickable = raw.clone()
        pickable[..., suppress_id] = finfo.min
    if temperature <= 0:
        best, chosen = pickable.max(dim=-1)  # ties: the lowest id
        processed = pickable
    else:
        scaled = (pickable / temperature).clamp(min=finfo.min, max=finfo.max)
        if top_k > 0:
            kth = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, finfo.min)
        probs = scaled.softmax(dim=-1)
        if top_p < 1.0:
            ordered, _ = probs.sort(dim=-1, descending=True)
            before = ordered.cumsum(dim=-1) - ordered  # mass of strictly more probable tokens
            tau = ordered.masked_fill(before >= top_p, float("inf")).amin(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < tau, 0.0)
        processed = probs.log()
        flat = probs.reshape(-1, probs.shape[-1])
        chosen = torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
        best = raw.gather(-1, chosen[..., None]).squeeze(-1)
    shift = raw.amax(dim=-1) if temperature > 0 else best
    log_z = shift + (raw - shift[..., None]).exp().sum(dim=-1).log()
    picked = raw.gather(-1, chosen[..., None]).squeeze(-1)
    return chosen, (picked - log_z).exp(), processed


def _select(confidence: torch.Tensor, masked: torch.Tensor, count: int, threshold: Optional[float]) -> torch.Tensor:
    """Positions ``[B, n]`` to unmask: the ``count`` most confident masked ones (ties: leftmost),
    plus (threshold decoding) every masked one strictly above ``threshold``."""
    conf = confidence.masked_fill(~masked, torch.finfo(confidence.dtype).min)
    order = conf.argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(conf.shape[-1], device=conf.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    pick = (rank < count) & masked
    if threshold is not None:
        pick |= masked & (confidence > threshold)
    return pick
