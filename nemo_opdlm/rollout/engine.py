"""The decode engine: what every decoder of a rollout shares, and the settings it runs under.

One job: hold one rank's model chunks for decoding under a :class:`SamplerConfig` (the decoding, the
model's block-diffusion facts, the EOS and padding ids) and give the decoders (``cached.py``,
``lockstep.py``, ``ar.py``) their machinery: the decode session (eval mode, no grad, the KV
cache), micro-batching rows through the pipeline stages, one forward per round, the random stream,
choosing tokens and sharing the last stage's decisions. The decoders take an engine; the sampler
(``sampler.py``) is an engine that picks the decoder and turns its records into a ``Rollout``.
Non-goals: the decoding rules themselves (the decoders, ``rows.py``, ``schedules.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.data.prompts import default_pad
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.models.gpt import DiffusionGPTModel
from nemo_opdlm.models.student import unwrap
from nemo_opdlm.rollout.decode import DecodeConfig
from nemo_opdlm.rollout.kv_cache import BlockKVCache
from nemo_opdlm.rollout.schedules import BlockSchedule
from nemo_opdlm.rollout.sampling import choose_tokens
from nemo_opdlm.rollout.stages import MicroBatch, StageRunner, attention_layers, share_decisions, split_rows
from nemo_opdlm.runtime.device import decoding_scope
from nemo_opdlm.runtime.seeding import rollout_seed


@dataclass(kw_only=True)
class SamplerConfig:
    """Everything a sampler needs: how to decode, and the facts of the model and tokenizer."""

    decode: DecodeConfig
    """Mode, threshold, rounds per block, sampling, cache options."""
    diffusion: Optional[DiffusionConfig] = None
    """The model's block size, [MASK] id and logit alignment; None for a model decoded only
    autoregressively (``decode.mode='ar'``: the AR teacher)."""
    max_new_tokens: int = 512
    """Response length limit (rounded up to whole blocks; the tail beyond it is padding);
    ``generate`` may override it per call."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a response (e.g. <|im_end|> and <|endoftext|>)."""
    pad_token_id: Optional[int] = None
    """Fills response positions that were never decoded; None: the first EOS id (0 without EOS)."""
    num_microbatches: Optional[int] = None
    """Micro-batches per round through the pipeline; None: the pipeline size (1 without PP)."""
    suppress_mask_token: bool = True
    """Never emit [MASK] as a decoded token (it still counts in the confidence's softmax)."""
    seed: int = 0
    """Seed of the sampler's random stream (offset by the data-parallel rank; same on TP/PP peers)."""
    schedule: BlockSchedule = field(init=False)
    """The blocks' schedule (``schedules.BlockSchedule.of(diffusion, decode)``), made here once."""

    def __post_init__(self) -> None:
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampler.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ConfigError(f"sampler.num_microbatches must be >= 1 or None, got {self.num_microbatches}")
        if self.decode.mode != "ar":
            if self.diffusion is None:
                raise ConfigError(f"decoding mode {self.decode.mode!r} is block diffusion: the sampler needs the "
                                  "model's diffusion settings (block size, [MASK] id)")
            if self.diffusion.mask_token_id in self.eos_token_ids:
                raise ConfigError("the [MASK] id must not be an EOS id")
        self.schedule = BlockSchedule.of(self.diffusion, self.decode)  # checks steps_per_block

    @property
    def mask_id(self) -> Optional[int]:
        return None if self.diffusion is None else self.diffusion.mask_token_id

    @property
    def shift_logits(self) -> bool:
        return self.diffusion is not None and self.decode.mode != "ar" and self.diffusion.shift_logits

    @property
    def pad_id(self) -> int:
        return self.pad_token_id if self.pad_token_id is not None else default_pad(self.eos_token_ids)


@contextlib.contextmanager
def rollout_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode and no_grad for the duration of a rollout; every module's mode restored afterwards,
    inside the runtime's decoding scope (``runtime.device.decoding_scope``)."""
    modes = [(m, m.training) for chunk in chunks for m in chunk.modules()]
    try:
        for chunk in chunks:
            chunk.eval()
        with torch.no_grad(), decoding_scope():
            yield
    finally:
        for module, training in modes:
            module.training = training


class DecodeEngine:
    """This rank's model chunks (the training weights) decoding under a :class:`SamplerConfig`.

    It owns its random stream (seeded once; successive calls continue it) and, per call, its KV
    cache (``session``); its methods are the machinery the decoders share.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], config: SamplerConfig) -> None:
        self.config = config
        self.chunks: list[DiffusionGPTModel] = [unwrap(c) for c in chunks]
        self.parallel = self.chunks[0].parallel
        self.stages = StageRunner(self.chunks)
        self.device = self.stages.device
        model_config = self.chunks[0].config
        self.groups = model_config.num_query_groups // self.parallel.tp_size
        self.head_dim = model_config.kv_channels
        self.num_microbatches = config.num_microbatches or self.parallel.pp_size
        pad_slots = config.decode.pad_commit_slots
        self.pad_commit_slots = self.device.type == "cuda" if pad_slots is None else pad_slots
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(rollout_seed(config.seed, self.parallel.dp_rank))
        self.eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=self.device)

    @contextlib.contextmanager
    def session(self, batch: int, capacity: int, use_cache: bool) -> Iterator[Optional[BlockKVCache]]:
        """Rollout mode + (optionally) a KV cache for every attention layer of this rank."""
        with rollout_mode(self.chunks):
            if not use_cache:
                yield None
                return
            layers = attention_layers(self.chunks)
            yield BlockKVCache(
                layer_numbers=[layer.layer_number for layer in layers], batch=batch, capacity=capacity,
                groups=self.groups, head_dim=self.head_dim, dtype=self.stages.dtype, device=self.device,
            )

    def microbatches(self, ids: Tensor, pos: Tensor, meta: Tensor, index: slice | Tensor) -> list[MicroBatch]:
        """Micro-batches over active rows ``index`` (inputs given for those rows only)."""
        out = []
        for sl in split_rows(ids.shape[0], self.num_microbatches):
            if isinstance(index, slice):
                rows: slice | Tensor = slice(index.start + sl.start, index.start + sl.stop)
            else:
                rows = index[sl]
            out.append(MicroBatch(ids[sl], pos[sl], meta[sl], rows))
        return out

    def forward(self, ids: Tensor, pos: Tensor, meta: Tensor, cache: Optional[BlockKVCache], commit: int | Tensor,
                keep_last: int) -> Optional[Tensor]:
        """One round over all active rows: logits ``[N, keep_last, V/tp]`` on the last stage (None
        elsewhere). ``commit``: current columns the cache keeps, for every row or per row (``[N]``)."""
        logits = self.stages.run(self.microbatches(ids, pos, meta, slice(0, ids.shape[0])), cache, keep_last)
        if cache is not None:
            cache.commit(commit)
        return logits

    def draw(self, *shape: int) -> Optional[Tensor]:
        """Uniforms for sampling (None when greedy or not on the last stage), drawn for every
        original row: callers draw a fixed amount per block (or per token), so the stream does not
        depend on which rows are still decoding or how many rounds a block took."""
        if self.config.decode.temperature == 0 or not self.stages.is_last_stage:
            return None
        return torch.rand(*shape, generator=self.generator, device=self.device)

    def choose(self, logits: Tensor, uniform: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Candidates and confidences ``[N, K]`` from logits ``[N, K, V/tp]``."""
        d, mask = self.config.decode, self.config.mask_id
        return choose_tokens(
            logits, temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, uniform=uniform,
            suppress_id=mask if self.config.suppress_mask_token else None, group=self.parallel.tp_group,
        )

    def share(self, t: Tensor) -> Tensor:
        """The last stage's decisions ``t`` on every rank of the model-parallel group."""
        return share_decisions(t, self.parallel)
