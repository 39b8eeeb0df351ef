"""The decoder used for both student and teacher: megatron-core ``GPTModel`` with its own forward.

One job: map (tokens, position ids, token metadata) to vocab-parallel logits. It keeps every
module of ``GPTModel`` (embedding, ``TransformerBlock``, output layer, RoPE frequencies, sharded
state dict, PP hooks) and replaces only ``forward``, for two reasons megatron-core's does not cover:

- RoPE is taken at explicit ``position_ids`` per row: xt reuses x0's positions and left-padded
  prompts start at 0 (megatron-core applies RoPE at 0..S-1 outside its inference paths);
- the logits are returned ``[B, S, V/tp]`` with the vocabulary padding filled with the dtype's
  minimum, so that no softmax, top-k or KL ever gives it mass (and no -inf makes NaN).

There is no logit shift here: a position's logits predict the token *at* that position for the
student; the teacher's right shift lives in ``teacher/targets.py``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from nemo_opdlm.models.attention import BlockAttention, ForwardContext, KVCache
from nemo_opdlm.models.config import ModelConfig
from nemo_opdlm.runtime.context import ParallelContext


class DiffusionGPTModel(GPTModel):
    """megatron-core GPT whose forward takes position ids and block-mask metadata.

    Args (beyond GPTModel's): ``real_vocab_size``: the tokenizer's vocabulary before padding;
    ``parallel``: the layout it was built for (its groups go to megatron-core as ``pg_collection``;
    whoever is handed the chunks reads their layout here).
    """

    def __init__(self, *args, real_vocab_size: int, parallel: ParallelContext, rope_scaling_params=None,
                 **kwargs) -> None:
        super().__init__(*args, pg_collection=parallel.pgs, **kwargs)
        self.real_vocab_size = real_vocab_size
        self.parallel = parallel
        self.attention = [m for m in self.modules() if isinstance(m, BlockAttention)]
        """This chunk's core-attention layers (each forward hands them its ``ForwardContext``)."""
        if rope_scaling_params is not None and hasattr(self, "rotary_pos_emb"):
            # megatron-core only exposes the Llama-3 factor; apply all four HF parameters to the
            # unscaled frequencies it built (GPTModel got rope_scaling=False).
            rope = self.rotary_pos_emb
            rope.inv_freq = rope._apply_scaling(
                rope.inv_freq,
                factor=rope_scaling_params.factor,
                low_freq_factor=rope_scaling_params.low_freq_factor,
                high_freq_factor=rope_scaling_params.high_freq_factor,
                original_max_position_embeddings=rope_scaling_params.original_max_position_embeddings,
            )

    def rope_freqs(self, position_ids: Tensor) -> Tensor:
        """RoPE angles ``[S, B, 1, D]`` at explicit positions (fp32, as HF computes them)."""
        inv_freq = self.rotary_pos_emb.inv_freq.to(position_ids.device)  # [D/2]
        angles = position_ids.float()[..., None] * inv_freq  # [B, S, D/2]
        angles = torch.cat([angles, angles], dim=-1)  # [B, S, D]
        return angles.transpose(0, 1)[:, :, None, :]  # [S, B, 1, D]

    def forward(  # type: ignore[override]
        self,
        input_ids: Optional[Tensor],
        position_ids: Tensor,
        attention_mask: Tensor,
        labels: Optional[Tensor] = None,
        logits_last: Optional[int] = None,
        logits_columns: Optional[Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        decoding: bool = False,
        **unused,
    ) -> Tensor:
        """Logits ``[B, S, V_pad/tp]`` on the last stage, hidden states ``[S, B, H]`` elsewhere.

        Args:
            input_ids: ``[B, S]`` token ids (ignored on non-first PP stages).
            position_ids: ``[B, S]`` RoPE positions.
            attention_mask: ``[B, 2, S]`` token metadata from ``masks.build_layout`` (``[B, 3, S]``
                with a doc channel: packed rows, ``distill/packing.py``).
            logits_last: project only the last ``logits_last`` columns to the vocabulary (logits
                ``[B, logits_last, V_pad/tp]``). The losses read the response columns only; at a
                151k vocabulary the output layer is about a quarter of a 0.6B model's FLOPs, and the
                prompt and x0 columns' logits would be computed (and stored for backward) for nothing.
            logits_columns: instead of ``logits_last``, project these columns ``[n]`` (any order,
                repeats allowed; logits ``[B, n, V_pad/tp]``): a shifted student reads its
                predictions from columns scattered over x0 and xt (``masks.prediction_columns``).
            kv_cache: a cached decoding forward: the cache (``BlockKVCache.forward``'s), which every
                attention layer extends with this forward's keys and reads the committed ones from.
            decoding: a decoding forward without a cache (no backward; Flex layers run SDPA).
        """
        if labels is not None:
            raise ValueError("DiffusionGPTModel returns logits; losses live in distill/loss.py")
        decoder_input = self.embedding(input_ids=input_ids, position_ids=None) if self.pre_process else None
        with self._forward_context(ForwardContext(kv_cache, decoding)):
            hidden = self.decoder(
                hidden_states=decoder_input,
                attention_mask=attention_mask,
                rotary_pos_emb=self.rope_freqs(position_ids),
            )  # [S, B, H]
        if not self.post_process:
            return hidden
        if logits_last is not None and logits_columns is not None:
            raise ValueError("give logits_last or logits_columns, not both")
        if logits_last is not None:
            if not 1 <= logits_last <= hidden.shape[0]:
                raise ValueError(f"logits_last={logits_last} must be in [1, {hidden.shape[0]}] columns")
            hidden = hidden[-logits_last:]
        elif logits_columns is not None:
            hidden = hidden.index_select(0, logits_columns.to(hidden.device))  # [n, B, H]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        # Batch-first before the projection: transposing [S, B, H] costs V/H times less than
        # transposing the logits (a copy of every logit, forward and backward).
        hidden = hidden.transpose(0, 1).contiguous()  # [B, S, H]
        logits, _ = self.output_layer(hidden, weight=weight)  # [B, S, V/tp]
        return mask_vocab_padding(logits, self.real_vocab_size, self.parallel.tp_rank)


    @contextlib.contextmanager
    def _forward_context(self, ctx: ForwardContext) -> Iterator[None]:
        """Hand ``ctx`` to this chunk's attention layers for one forward."""
        if any(layer.context is not None for layer in self.attention):
            raise RuntimeError("a forward of this model is already running (nested forwards are not supported)")
        for layer in self.attention:
            layer.context = ctx
        try:
            yield
        finally:
            for layer in self.attention:
                layer.context = None


def mask_vocab_padding(logits: Tensor, real_vocab_size: int, tp_rank: int) -> Tensor:
    """Fill the padded vocabulary entries of TP rank ``tp_rank``'s logit shard with the dtype's minimum."""
    local = logits.shape[-1]
    start = tp_rank * local
    n_real = min(max(real_vocab_size - start, 0), local)
    if n_real == local:
        return logits
    keep = torch.arange(local, device=logits.device) < n_real
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def build_gpt(model: ModelConfig, parallel: ParallelContext, vp_stage: Optional[int] = None) -> DiffusionGPTModel:
    """Build this rank's chunk ``vp_stage`` (None without VPP) of the decoder for ``parallel``'s
    layout (no weights loaded; see ``convert/``)."""
    from nemo_opdlm.models.specs import layer_spec

    pre_process, post_process = parallel.stage_ends(vp_stage)
    config = model.transformer_config(
        tp_size=parallel.tp_size, pp_size=parallel.pp_size, use_cpu_initialization=not torch.cuda.is_available()
    )
    kwargs = dict(
        config=config,
        transformer_layer_spec=layer_spec(model),
        vocab_size=model.padded_vocab_size(parallel.tp_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        real_vocab_size=model.vocab_size,
        parallel=parallel,
        rope_scaling_params=model.rope_scaling,
    )
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    net = DiffusionGPTModel(**kwargs)
    if model.dtype != torch.float32:
        # megatron-core creates torch norms in fp32 whatever params_dtype says (Float16Module
        # casts them for training). The frozen teacher and the rollout run without that wrapper,
        # and a bf16 input with an fp32 norm weight misses the fused RMSNorm kernel in every layer.
        net.to(model.dtype)
    if torch.cuda.is_available():
        net.cuda()
    return net
