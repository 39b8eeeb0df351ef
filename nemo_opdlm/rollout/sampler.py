"""On-policy rollouts: batched block-by-block decoding with the student's own (training) weights.

One job: decode responses to a batch of left-padded prompts with the Megatron model chunks that
train (same weights object: no copy, no reload), recording every decision: the round at which
each token was unmasked (``step_map``), its block, and padding. Non-goals: turning rollouts into
training rows (``distill/states.py``), choosing the rollout length (``schedules.LengthCurriculum``).

Decoding, per row and block ``b``: the block starts as ``block_size`` [MASK] tokens; each round
runs the model over the block, picks a candidate and a confidence per position (``sampling.py``)
and unmasks some positions (``schedules.py``): ``static`` the k most confident, ``dynamic`` every
one above the threshold and at least k. The block ends when nothing is masked. A row whose block
holds an EOS (or that reached the length limit) is finished; it is dropped from the batch (and the
KV cache) so that it costs nothing more, and its later tokens are padding.

Rows are asynchronous: a row moves to its next block as soon as its own block is complete, so a
batch round is one forward in which rows sit in different blocks (batch-level rounds = the
slowest row's rounds, not the sum over blocks of the slowest row per block). With the KV cache
(``kv_cache.py``, a committed length per row) every round forwards ``[commit slot | current
block]`` per row: a row whose block just completed commits it there (its final tokens) while
starting the next block; the others' commit slots are PAD. Every decision is the one the row
would make decoding alone (its own context, round within the block and per-block uniforms).

A cached round reads the device once (``_RoundSummary``): on a GPU every read of a device value
on the host waits for the queued kernels, so the Python and launch work of the next forward could
not overlap this one. What the host needs for the next round (rows complete or finished, rows
committing, the lowest and highest block, the cache's frontier) is reduced on the device and read
as one small tensor; everything else (which rows commit, finish or move in the cache) stays on the
device as masks, and index tensors come from sorts whose sizes the host knows (never ``nonzero``).

Attention follows ``masks.build_layout`` of ``[prompt | response]`` exactly as training does: the
prompt is block-causal with blocks aligned to its end, response blocks are block-causal. Without
the cache (the reference path) rows decode in lockstep and every round recomputes
``[prompt | blocks 0..b]``; it decodes the same tokens and rounds per row.

Under TP every rank computes the same decisions from vocab-parallel logits (same random stream);
under PP the last stage decides and broadcasts, and rounds pass micro-batches through the stages.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from nemo_opdlm.data.prompts import left_pad  # noqa: F401  (re-exported as nemo_opdlm.rollout.left_pad)
from nemo_opdlm.models import masks
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.gpt import DiffusionGPTModel
from nemo_opdlm.models.student import unwrap
from nemo_opdlm.rollout import schedules
from nemo_opdlm.rollout.kv_cache import BlockKVCache
from nemo_opdlm.rollout.sampling import choose_tokens
from nemo_opdlm.rollout.stages import MicroBatch, StageRunner, attention_layers, share_decisions, split_rows
from nemo_opdlm.runtime.cpu_compat import device_mode_suspended
from nemo_opdlm.runtime.seeding import rollout_seed

@dataclass(kw_only=True)
class SamplerConfig:
    """How rollouts are decoded."""

    mask_token_id: int
    """Id of the [MASK] token that fills undecoded positions."""
    block_size: int = 4
    """Tokens per block (the student's training block size)."""
    steps_per_block: int = 4
    """Rounds per block; the static rule unmasks block_size / steps_per_block tokens per round."""
    mode: str = "dynamic"
    """'static' (k most confident per round) or 'dynamic' (every one above threshold, at least k)."""
    threshold: float = 0.9
    """Dynamic rule: unmask positions whose raw-softmax confidence is strictly above this."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    max_new_tokens: int = 512
    """Response length limit (rounded up to whole blocks; the tail beyond it is padding)."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a response (e.g. <|im_end|> and <|endoftext|>)."""
    pad_token_id: Optional[int] = None
    """Fills response positions that were never decoded; None: the first EOS id (0 without EOS)."""
    use_cache: bool = True
    """Block KV cache (False: recompute everything each round, the reference path)."""
    pad_commit_slots: bool = False
    """Cached rounds where only some rows commit: True = one forward, every row ``[commit slot |
    block]`` with the slots of rows not committing PAD (fewest launches: GPU decode, memory-bound);
    False = the rows that commit and the others forward separately, no padded tokens (compute-bound
    CPU decode; the second group's cached keys are gathered, a copy)."""
    num_microbatches: Optional[int] = None
    """Micro-batches per round through the pipeline; None: the pipeline size (1 without PP)."""
    suppress_mask_token: bool = True
    """Never emit [MASK] as a decoded token (it still counts in the confidence's softmax)."""
    shift_logits: bool = False
    """The model predicts token i at position i - 1 (``DiffusionConfig.shift_logits``): a block's
    first token from the last clean token before the block, the others from the previous position
    of the block. False: every position predicts itself (the paper)."""
    seed: int = 0
    """Seed of the sampler's random stream (offset by the data-parallel rank; same on TP/PP peers)."""

    def __post_init__(self) -> None:
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        if self.mode not in schedules.MODES:
            raise ConfigError(f"sampler.mode must be one of {schedules.MODES}, got {self.mode!r}")
        if self.block_size < 1:
            raise ConfigError(f"sampler.block_size must be >= 1, got {self.block_size}")
        schedules.static_counts(self.block_size, self.steps_per_block)  # validates steps_per_block
        if self.temperature < 0:
            raise ConfigError(f"sampler.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampler.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampler.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampler.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mask_token_id < 0:
            raise ConfigError(f"sampler.mask_token_id must be >= 0, got {self.mask_token_id}")
        if self.mask_token_id in self.eos_token_ids:
            raise ConfigError("sampler.mask_token_id must not be an EOS id")
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise ConfigError(f"sampler.num_microbatches must be >= 1 or None, got {self.num_microbatches}")

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0


@dataclass
class RolloutMetrics:
    """What one ``generate`` call did."""

    tokens_generated: int
    """Valid response tokens (EOS included, padding excluded)."""
    rounds: int
    """Batch-level denoising rounds: each gives every active row logits for its current block (with
    rows asynchronous, the slowest row's own rounds; a cached round with rows committing and rows not
    is two forwards unless ``pad_commit_slots``)."""
    tokens_per_round: float
    """Parallelism: valid tokens / rounds each row actually needed (summed over its blocks)."""
    frac_finished_eos: float
    """Fraction of rows that ended with an EOS (the rest hit the length limit)."""
    wall_time_s: float
    tokens_per_s: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class Rollout:
    """Decoded responses and every decision that produced them.

    Attributes:
        prompt_ids: ``[B, P]`` left-padded prompts (as given).
        prompt_lens: ``[B]`` true prompt lengths.
        tokens: ``[B, L]`` responses (x0); ``L`` is a multiple of ``block_size``. Blocks after a row
            finished hold ``pad_id``; the block holding the EOS keeps what was decoded after it.
        step_map: ``[B, L]`` round within its block at which each token was unmasked; -1 where
            nothing was decoded.
        block_index: ``[B, L]`` block of each response position.
        valid: ``[B, L]`` True for real response tokens: decoded, up to and including the first
            EOS, and within ``max_new_tokens``; False = padding.
        finished_eos: ``[B]`` the row ended with an EOS.
        block_size: tokens per block.
        metrics: see :class:`RolloutMetrics`.
    """

    prompt_ids: Tensor
    prompt_lens: Tensor
    tokens: Tensor
    step_map: Tensor
    block_index: Tensor
    valid: Tensor
    finished_eos: Tensor
    block_size: int
    metrics: RolloutMetrics = field(repr=False)


@contextlib.contextmanager
def rollout_mode(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eval mode and no_grad for the duration of a rollout; every module's mode restored afterwards.

    FlexAttention layers decode with SDPA: compiled flex kernels specialise on the key length,
    which grows every block, and tile queries by 128 where a round has a block or two. On CPU the
    compatibility layer's device mode is lifted (``cpu_compat.device_mode_suspended``).
    """
    modes = [(m, m.training) for chunk in chunks for m in chunk.modules()]
    layers = attention_layers(chunks)
    backends = [(layer, layer.backend) for layer in layers]
    try:
        for chunk in chunks:
            chunk.eval()
        for layer in layers:
            if layer.backend == "flex":
                layer.backend = "sdpa"
        with torch.no_grad(), device_mode_suspended():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for layer, backend in backends:
            layer.backend = backend


def _row_limits(max_new: int | Tensor, batch: int, device: torch.device) -> tuple[Tensor, int]:
    """``(limits [B], longest)``: every row's response-length limit (one for all, or one per row)."""
    if isinstance(max_new, Tensor):
        if max_new.shape != (batch,):
            raise ValueError(f"max_new_tokens must be an int or have shape [{batch}], got {tuple(max_new.shape)}")
        lo, longest = (int(v) for v in torch.stack([max_new.min(), max_new.max()]).tolist())  # one host read
        limits = max_new.to(device=device, dtype=torch.long)
    else:
        lo = longest = int(max_new)
        limits = torch.full((batch,), longest, dtype=torch.long, device=device)
    if lo < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
    return limits, longest


def _valid_mask(tokens: Tensor, step_map: Tensor, eos: Tensor, limits: Tensor) -> tuple[Tensor, Tensor]:
    """``(valid [B, L], finished_eos [B])`` from what was decoded within each row's ``limits [B]``."""
    cols = torch.arange(tokens.shape[1], device=tokens.device)
    in_limit = (step_map >= 0) & (cols[None] < limits[:, None])  # [B, L]
    is_eos = torch.isin(tokens, eos) & in_limit  # [B, L]
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # [B, L]
    valid = in_limit & ~after_eos
    return valid, (is_eos & valid).any(-1)


def _rows_rounds(step_map: Tensor, valid: Tensor, block_size: int) -> int:
    """Rounds the rows needed: per row and block with a valid token, its last unmasking round + 1."""
    batch, length = step_map.shape
    steps = step_map.view(batch, length // block_size, block_size)  # [B, nb, bs]
    used = valid.view(batch, length // block_size, block_size).any(-1)  # [B, nb]
    return int(((steps.amax(-1) + 1) * used).sum())


def _first_true(mask: Tensor, count: int) -> Tensor:
    """Ascending indices ``[count]`` of the True entries of ``mask [N]``, ``count`` of them (known on
    the host): a stable sort puts them first. ``mask.nonzero()`` would read the device to size its
    output, a host sync."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]


def _shifted(logits: Tensor, first: Optional[Tensor], starting: Tensor) -> tuple[Tensor, Tensor]:
    """Predictions ``[N, bs, V/tp]`` of a shifted model's block positions, and the updated ``first``.

    ``logits [N, bs + 1, V/tp]``: column 0 is the last clean token before the block for the rows
    ``starting [N]`` their block this round (the prompt's last token, or the previous block's last
    token in its commit slot), and unspecified for the others; columns 1.. are the block. A row's
    first-token prediction comes from its clean context only, so it is computed once, when the
    block starts, and kept in ``first [N, V/tp]`` for the block's later rounds.
    """
    fresh = logits[:, 0]  # [N, V/tp]
    first = fresh if first is None else torch.where(starting[:, None], fresh, first)
    return torch.cat([first[:, None], logits[:, 1:-1]], dim=1), first


@dataclass(frozen=True)
class _RoundSummary:
    """What the host knows after a cached round: the round's only read of device values."""

    complete: int
    """Rows whose block is complete (they record it and move to their next block)."""
    finished: int
    """Rows among those that are done (dropped from the batch, and the cache)."""
    lo: int
    """Lowest block of the rows still decoding (their block next round)."""
    hi: int
    """Highest block of the rows still decoding: the cache frontier after next round's commit is
    ``P + hi * bs`` (a row in block ``b`` has committed its prompt and blocks ``0..b-1``)."""
    kept_hi: int
    """Highest block this round among the rows that stay: the frontier after the compaction."""

    @classmethod
    def read(cls, block: Tensor, complete: Tensor, finished: Tensor) -> "_RoundSummary":
        """From this round's blocks, complete and finished rows (all ``[N]``, N >= 1): one host sync."""
        nxt = block + complete.long()  # [N] each row's block next round
        counts = torch.stack([complete, finished]).sum(-1)  # [2]
        # Over the rows that stay: max of -nxt (= -lo), of nxt (hi) and of block (kept_hi).
        blocks = torch.where(~finished, torch.stack([-nxt, nxt, block]), torch.iinfo(torch.long).min).amax(-1)  # [3]
        n_complete, n_finished, neg_lo, hi, kept_hi = torch.cat([counts, blocks]).tolist()
        return cls(n_complete, n_finished, -neg_lo, hi, kept_hi)


class _Decode:
    """The state one ``generate`` call shares between its decoding loop and its records.

    Holds the layout of ``[prompt | response]`` (positions, metadata), the response records being
    filled (``tokens``, ``step_map``), the unmasking schedule, and the per-block uniforms: block
    ``b``'s ``[B, steps, block_size]`` draw is the ``b``-th draw of the sampler's stream (drawn
    lazily, in block order, when the first row reaches block ``b``), and row ``i`` in round ``r``
    of block ``b`` reads ``[i, r]`` of it, whichever rows are decoding and whenever it gets there.
    """

    def __init__(self, sampler: "BlockSampler", prompt_ids: Tensor, prompt_lens: Tensor, limits: Tensor,
                 longest: int, static_rows: Optional[Tensor] = None) -> None:
        cfg, dev = sampler.config, sampler.device
        self.sampler = sampler
        self.prompt_ids = prompt_ids  # [B, P]
        self.batch, self.width = prompt_ids.shape
        self.block_size = cfg.block_size
        self.n_blocks = -(-longest // cfg.block_size)
        self.length = self.n_blocks * cfg.block_size
        self.limits = limits  # [B] each row's length limit
        self.last_block = (limits + cfg.block_size - 1) // cfg.block_size - 1  # [B] each row's last block
        all_valid = torch.ones(self.batch, self.length, dtype=torch.bool, device=dev)
        layout = masks.build_layout(prompt_lens, self.width, all_valid, cfg.block_size, with_xt=False)
        self.pos_all, self.meta_all = layout.position_ids, layout.meta  # [B, P+L], [B, 2, P+L]
        self.tokens = torch.full((self.batch, self.length), cfg.pad_id, dtype=torch.long, device=dev)  # [B, L]
        self.step_map = torch.full((self.batch, self.length), -1, dtype=torch.long, device=dev)  # [B, L]
        self.counts = torch.tensor(schedules.static_counts(cfg.block_size, cfg.steps_per_block), device=dev)
        self.threshold: Optional[float | Tensor] = cfg.threshold if cfg.mode == "dynamic" else None
        if static_rows is not None and self.threshold is not None:
            # [B, 1]: rows decoded with the static rule get a threshold no confidence exceeds
            self.threshold = torch.where(static_rows.to(dev), float("inf"), cfg.threshold)[:, None].float()
        self._drawn: list[Optional[Tensor]] = []  # per block: [B, steps, bs] (None once no row needs it)
        self._window: tuple[int, int, Optional[Tensor]] = (0, -1, None)

    def uniforms(self, rows: Tensor, block: Tensor, step: Tensor, lo: int, hi: int) -> Optional[Tensor]:
        """Uniforms ``[N, bs]`` of rows ``rows`` (original ids) in round ``step`` of block ``block``
        (all ``[N]``); None when greedy or not on the last pipeline stage. ``lo``/``hi``: the lowest
        and highest of ``block``, known on the host (reading them here would be a host sync)."""
        while len(self._drawn) <= hi:
            draw = self.sampler._uniforms(self.batch, len(self.counts), self.block_size)  # [B, steps, bs]
            if draw is None:
                return None
            self._drawn.append(draw)
        if self._window[:2] != (lo, hi):
            for b in range(lo):  # no row will read blocks below the slowest row's again
                self._drawn[b] = None
            self._window = (lo, hi, torch.stack(self._drawn[lo: hi + 1]))  # [hi-lo+1, B, steps, bs]
        window = self._window[2]
        assert window is not None
        return window[block - lo, rows, step]  # [N, bs]

    def threshold_of(self, rows: Tensor) -> Optional[float | Tensor]:
        """The dynamic rule's threshold for rows ``rows`` (original ids): None (static), a float, or
        ``[N, 1]`` when some rows decode statically (``generate``'s ``static_rows``)."""
        return self.threshold[rows] if isinstance(self.threshold, Tensor) else self.threshold

    def finishes(self, x: Tensor, rows: Tensor, block: Tensor) -> Tensor:
        """``[N]``: rows ``rows`` (original ids) whose block ``block`` now holds ``x [N, bs]`` are done
        (an EOS within the row's length limit, or its last block)."""
        last = block == self.last_block[rows]  # [N]
        if not self.sampler._eos.numel():
            return last
        cols = block[:, None] * self.block_size + torch.arange(self.block_size, device=x.device)  # [N, bs]
        in_limit = cols < self.limits[rows, None]  # [N, bs]
        eos = (x[..., None] == self.sampler._eos).any(-1) & in_limit  # [N, bs] (isin can sync)
        return eos.any(-1) | last


class BlockSampler:
    """Decodes with this rank's model chunks (the training weights) under a :class:`SamplerConfig`.

    It owns its random stream (seeded once; successive calls continue it) and, per call, its KV
    cache. ``generate`` is the block-diffusion rollout; ``generate_ar`` decodes the same weights
    as a plain causal next-token model (the teacher's way; for baselines and evaluation).
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], config: SamplerConfig) -> None:
        self.config = config
        self.chunks: list[DiffusionGPTModel] = [unwrap(c) for c in chunks]
        self.parallel = self.chunks[0].parallel
        self.stages = StageRunner(self.chunks)
        self.device = self.stages.device
        self.is_last_stage = self.stages.is_last_stage
        model_config = self.chunks[0].config
        self.groups = model_config.num_query_groups // self.parallel.tp_size
        self.head_dim = model_config.kv_channels
        self.num_microbatches = config.num_microbatches or self.parallel.pp_size
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(rollout_seed(config.seed, self.parallel.dp_rank))
        self._eos = torch.tensor(config.eos_token_ids, dtype=torch.long, device=self.device)

    # --- shared machinery --------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self, batch: int, capacity: int, use_cache: bool) -> Iterator[Optional[BlockKVCache]]:
        """Rollout mode + (optionally) a bound KV cache."""
        with rollout_mode(self.chunks):
            if not use_cache:
                yield None
                return
            layers = attention_layers(self.chunks)
            cache = BlockKVCache(
                num_layers=len(layers), batch=batch, capacity=capacity, groups=self.groups,
                head_dim=self.head_dim, dtype=self.stages.dtype, device=self.device,
            )
            with cache.bind(layers):
                yield cache

    def _forward(
        self, ids: Tensor, pos: Tensor, meta: Tensor, cache: Optional[BlockKVCache], commit: int | Tensor,
        keep_last: int,
    ) -> Optional[Tensor]:
        """One round over all active rows: logits ``[N, keep_last, V/tp]`` on the last stage (None elsewhere).

        ``commit``: current columns the cache keeps, for every row or per row (``[N]``).
        """
        mbs = [MicroBatch(ids[sl], pos[sl], meta[sl], sl) for sl in split_rows(ids.shape[0], self.num_microbatches)]
        logits = self.stages.run(mbs, cache, keep_last)
        if cache is not None:
            cache.commit(commit)
        return logits

    def _uniforms(self, *shape: int) -> Optional[Tensor]:
        """Uniforms for sampling (None when greedy), drawn for every original row.

        Callers draw a fixed amount per block (or per token), so the stream does not depend on
        which rows are still decoding or how many rounds a block took.
        """
        if self.config.temperature == 0 or not self.is_last_stage:
            return None
        return torch.rand(*shape, generator=self.generator, device=self.device)

    def _choose(self, logits: Tensor, uniform: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Candidates and confidences ``[N, K]`` from logits ``[N, K, V/tp]``."""
        cfg = self.config
        return choose_tokens(
            logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, uniform=uniform,
            suppress_id=cfg.mask_token_id if cfg.suppress_mask_token else None, group=self.parallel.tp_group,
        )

    def _check_prompts(self, prompt_ids: Tensor, prompt_lens: Tensor) -> tuple[Tensor, Tensor]:
        if prompt_ids.dim() != 2 or prompt_lens.shape != (prompt_ids.shape[0],):
            raise ValueError(
                f"prompt_ids must be [B, P] and prompt_lens [B]; got {tuple(prompt_ids.shape)}, "
                f"{tuple(prompt_lens.shape)}"
            )
        if prompt_ids.shape[0] == 0:
            raise ValueError("empty batch")
        return prompt_ids.to(self.device), prompt_lens.to(self.device)

    def _finish(
        self, prompt_ids: Tensor, prompt_lens: Tensor, tokens: Tensor, step_map: Tensor, block_size: int,
        limits: Tensor, rounds: int, start: float,
    ) -> Rollout:
        valid, finished = _valid_mask(tokens, step_map, self._eos, limits)
        n_tokens = int(valid.sum())
        row_rounds = _rows_rounds(step_map, valid, block_size)
        wall = time.perf_counter() - start
        metrics = RolloutMetrics(
            tokens_generated=n_tokens,
            rounds=rounds,
            tokens_per_round=n_tokens / max(row_rounds, 1),
            frac_finished_eos=float(finished.float().mean()),
            wall_time_s=wall,
            tokens_per_s=n_tokens / max(wall, 1e-9),
        )
        cols = torch.arange(tokens.shape[1], device=tokens.device)
        return Rollout(
            prompt_ids=prompt_ids, prompt_lens=prompt_lens, tokens=tokens, step_map=step_map,
            block_index=(cols // block_size).expand_as(tokens).clone(), valid=valid, finished_eos=finished,
            block_size=block_size, metrics=metrics,
        )

    # --- block diffusion ---------------------------------------------------------------------
    def generate(self, prompt_ids: Tensor, prompt_lens: Tensor, max_new_tokens: Optional[int | Tensor] = None,
                 static_rows: Optional[Tensor] = None) -> Rollout:
        """Block-diffusion rollouts for left-padded ``prompt_ids [B, P]`` with lengths ``prompt_lens [B]``.

        ``max_new_tokens`` overrides the config (e.g. from the length curriculum): one limit, or one
        per row (``[B]``, e.g. ``rollout.max_length_by_domain``; a row stops at its own limit and
        the response width is the longest). ``static_rows``
        (``[B]`` bool, dynamic mode only): these rows decode with the static rule (the scheduled
        count per round, no threshold), the others with the threshold, in the same forwards: the
        rollout then holds the block states of both decoders (``rollout.static_fraction``). Every
        rank of the model-parallel group must call this with the same prompts.
        """
        cfg = self.config
        start = time.perf_counter()
        prompt_ids, prompt_lens = self._check_prompts(prompt_ids, prompt_lens)
        limits, longest = _row_limits(cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                      prompt_ids.shape[0], self.device)
        if cfg.shift_logits and int(prompt_lens.min()) < 1:
            raise ValueError("a shifted model needs a non-empty prompt in every row: it predicts the first "
                             "response token from the last prompt token")
        if static_rows is not None and static_rows.shape != prompt_lens.shape:
            raise ValueError(f"static_rows must have shape {tuple(prompt_lens.shape)}, got {tuple(static_rows.shape)}")
        decode = _Decode(self, prompt_ids, prompt_lens, limits, longest, static_rows)
        if cfg.use_cache:
            rounds = self._decode_async(decode)
        else:
            rounds = self._decode_lockstep(decode)
        return self._finish(
            prompt_ids, prompt_lens, decode.tokens, decode.step_map, cfg.block_size, limits, rounds, start
        )

    def _decode_async(self, d: "_Decode") -> int:
        """Cached decoding, each row on its own block; returns the batch-level rounds.

        The first round forwards ``[prompt | block 0]`` for every row and commits the prompt. Then a
        row whose block completed in the previous round forwards ``[final tokens of that block |
        masks of its next block]`` and commits the first part after the forward; a row still inside
        its block forwards the block. Rows of both kinds go in separate forwards, or in one with the
        others' commit slots PAD (``pad_commit_slots``). Each row's decisions depend on its own
        context, its own round within the block and its own per-block uniforms only: the same as
        decoding it alone. The host reads the device once per round (``_RoundSummary``); active
        rows, rows committing and the block range are host ints taken from that read.
        """
        cfg, dev = self.config, self.device
        bs, width, batch = cfg.block_size, d.width, d.batch
        rows = torch.arange(batch, device=dev)  # original ids of the active rows
        block = torch.zeros(batch, dtype=torch.long, device=dev)  # [N] current block per row
        step = torch.zeros(batch, dtype=torch.long, device=dev)  # [N] round within the block
        x = torch.full((batch, bs), cfg.mask_token_id, dtype=torch.long, device=dev)  # [N, bs]
        st = torch.full_like(x, -1)  # [N, bs]
        offsets = torch.arange(bs, device=dev)  # [bs]
        n_out = bs + int(cfg.shift_logits)  # logit columns per row; shifted: also the one before the block
        first: Optional[Tensor] = None  # shifted: [N, V/tp] each row's prediction of its block's first token
        rounds = 0
        n, n_commit, lo, hi = batch, 0, 0, 0  # host: active rows, rows committing, block range
        with self._session(batch, width + d.length + bs, use_cache=True) as cache:
            assert cache is not None
            while n:
                if rounds == 0:
                    ids = torch.cat([d.prompt_ids, x], dim=1)  # [B, P + bs]
                    mbs = self._microbatches(
                        ids, d.pos_all[:, : width + bs], d.meta_all[:, :, : width + bs], slice(0, batch)
                    )
                    logits = self.stages.run(mbs, cache, n_out)
                    cache.commit(width)
                else:
                    committing = (step == 0) & (block > 0)  # [N] (n_commit of them)
                    order: Optional[Tensor] = None
                    if n_commit in (0, n) or cfg.pad_commit_slots:
                        groups: list[tuple[slice | Tensor, bool]] = [(slice(0, n), n_commit > 0)]
                    else:
                        order = _first_true(committing, n)  # [N] committing rows first, then the others
                        groups = [(order[:n_commit], True), (order[n_commit:], False)]
                    mbs = []
                    for index, with_slot in groups:
                        mbs += self._microbatches(*self._round_inputs(d, rows, block, x, committing, index, with_slot),
                                                  index)
                    logits = self.stages.run(mbs, cache, n_out)
                    if logits is not None and order is not None:
                        logits = torch.empty_like(logits).index_copy_(0, order, logits)
                    # A row in block b has committed its prompt and blocks 0..b-1 after this commit.
                    cache.commit(committing.long() * bs, largest=bs if n_commit else 0, frontier=width + hi * bs)
                rounds += 1
                if logits is not None:
                    if cfg.shift_logits:
                        logits, first = _shifted(logits, first, step == 0)
                    uniform = d.uniforms(rows, block, step, lo, hi)  # [N, bs] or None
                    cand, conf = self._choose(logits, uniform)  # [N, bs], [N, bs]
                    chosen = schedules.select_unmask(conf, st < 0, d.counts[step], d.threshold_of(rows))  # [N, bs]
                    x = torch.where(chosen, cand, x)
                    st = torch.where(chosen, step[:, None], st)
                x, st = share_decisions(torch.stack([x, st]), self.parallel).unbind(0)
                complete = ~(st < 0).any(-1)  # [N]
                finished = complete & d.finishes(x, rows, block)  # [N]
                step = step + 1
                summary = _RoundSummary.read(block, complete, finished)  # the round's host sync
                lo, hi, n_commit = summary.lo, summary.hi, summary.complete - summary.finished
                if not summary.complete:
                    continue
                done_rows = _first_true(complete, summary.complete)  # [c]
                cols = block[done_rows, None] * bs + offsets  # [c, bs]
                d.tokens[rows[done_rows, None], cols] = x[done_rows]
                d.step_map[rows[done_rows, None], cols] = st[done_rows]
                block = torch.where(complete, block + 1, block)
                step = torch.where(complete, 0, step)
                x = torch.where(complete[:, None], cfg.mask_token_id, x)
                st = torch.where(complete[:, None], -1, st)
                if summary.finished:
                    n -= summary.finished
                    kept = _first_true(~finished, n)  # [n]
                    rows, block, step, x, st = rows[kept], block[kept], step[kept], x[kept], st[kept]
                    first = None if first is None else first[kept]
                    cache.keep(kept, frontier=width + summary.kept_hi * bs if n else 0)
        return rounds

    def _round_inputs(
        self, d: "_Decode", rows: Tensor, block: Tensor, x: Tensor, committing: Tensor, index: slice | Tensor,
        with_slot: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, positions, meta)`` of active rows ``index`` for a cached round: their current block,
        after a commit slot when ``with_slot`` (final tokens of the previous block for the rows
        committing, PAD for the others)."""
        cfg, bs = self.config, self.config.block_size
        rows, block, x, committing = rows[index], block[index], x[index], committing[index]
        cur = d.width + block[:, None] * bs + torch.arange(bs, device=rows.device)  # [n, bs] columns
        ids = x  # [n, bs]
        cols = cur
        if with_slot:
            prev = d.tokens[rows].gather(1, (cur - d.width - bs).clamp(min=0))  # [n, bs]
            ids = torch.cat([torch.where(committing[:, None], prev, cfg.pad_id), x], dim=1)  # [n, 2bs]
            cols = torch.cat([(cur - bs).clamp(min=0), cur], dim=1)  # [n, 2bs]
        pos = d.pos_all[rows].gather(1, cols)  # [n, S]
        meta = d.meta_all[rows].gather(2, cols[:, None].expand(-1, 2, -1))  # [n, 2, S]
        if with_slot:
            meta[:, 1, :bs] = torch.where(committing[:, None], meta[:, 1, :bs], masks.PAD)
        return ids, pos, meta

    def _microbatches(self, ids: Tensor, pos: Tensor, meta: Tensor, index: slice | Tensor) -> list[MicroBatch]:
        """Micro-batches over active rows ``index`` (inputs given for those rows only)."""
        out = []
        for sl in split_rows(ids.shape[0], self.num_microbatches):
            if isinstance(index, slice):
                rows: slice | Tensor = slice(index.start + sl.start, index.start + sl.stop)
            else:
                rows = index[sl]
            out.append(MicroBatch(ids[sl], pos[sl], meta[sl], rows))
        return out

    def _decode_lockstep(self, d: "_Decode") -> int:
        """The reference: no cache, all rows on the same block, ``[prompt | blocks 0..b]`` recomputed
        every round; a row whose block is complete sits the remaining rounds out (unchanged)."""
        cfg, dev = self.config, self.device
        bs, width = cfg.block_size, d.width
        rows = torch.arange(d.batch, device=dev)
        rounds = 0
        with self._session(d.batch, 0, use_cache=False):
            for b in range(d.n_blocks):
                blk = width + b * bs  # first column of block b
                x = torch.full((rows.numel(), bs), cfg.mask_token_id, dtype=torch.long, device=dev)  # [N, bs]
                st = torch.full_like(x, -1)  # [N, bs]
                block = torch.full((rows.numel(),), b, dtype=torch.long, device=dev)  # [N]
                for r in range(len(d.counts)):
                    ids = torch.cat([d.prompt_ids[rows], d.tokens[rows, : b * bs], x], dim=1)  # [N, blk + bs]
                    # Shifted: the column before the block (its clean context's last token) predicts
                    # the block's first token, and each block column predicts the next one.
                    logits = self._forward(ids, d.pos_all[rows, : blk + bs], d.meta_all[rows, :, : blk + bs], None, 0,
                                           keep_last=bs + int(cfg.shift_logits))
                    rounds += 1
                    if logits is not None:
                        logits = logits[:, :bs]  # [N, bs, V/tp] the predictions of the block's positions
                        step = torch.full_like(block, r)  # [N]
                        cand, conf = self._choose(logits, d.uniforms(rows, block, step, b, b))  # [N, bs], [N, bs]
                        chosen = schedules.select_unmask(conf, st < 0, d.counts[r], d.threshold_of(rows))  # [N, bs]
                        x = torch.where(chosen, cand, x)
                        st = torch.where(chosen, r, st)
                    x, st = share_decisions(torch.stack([x, st]), self.parallel).unbind(0)
                    if not bool((st < 0).any()):
                        break
                d.tokens[rows, b * bs: (b + 1) * bs] = x
                d.step_map[rows, b * bs: (b + 1) * bs] = st
                finished = d.finishes(x, rows, block)  # [N]
                rows = rows[~finished]
                if rows.numel() == 0:
                    break
        return rounds

    # --- plain autoregressive decoding ---------------------------------------------------------
    def generate_ar(self, prompt_ids: Tensor, prompt_lens: Tensor,
                    max_new_tokens: Optional[int | Tensor] = None) -> Rollout:
        """Causal next-token decoding of the same weights (the teacher's way), one token per forward.

        Uses the config's sampling, EOS and cache settings; ``block_size``, ``steps_per_block`` and
        ``mode`` do not apply (``step_map`` is 0 for every decoded token, blocks are of size 1).
        ``max_new_tokens``: one limit or one per row, as for ``generate``.
        """
        cfg = self.config
        start = time.perf_counter()
        prompt_ids, prompt_lens = self._check_prompts(prompt_ids, prompt_lens)
        if int(prompt_lens.min()) < 1:
            raise ValueError("autoregressive decoding needs a non-empty prompt in every row")
        batch, width = prompt_ids.shape
        limits, max_new = _row_limits(cfg.max_new_tokens if max_new_tokens is None else max_new_tokens, batch,
                                      self.device)
        all_valid = torch.ones(batch, max_new, dtype=torch.bool, device=self.device)
        layout = masks.build_layout(prompt_lens, width, all_valid, 1, with_xt=False)
        pos_all, meta_all = layout.position_ids, layout.meta  # [B, P+L], [B, 2, P+L]
        tokens = torch.full((batch, max_new), cfg.pad_id, dtype=torch.long, device=self.device)
        step_map = torch.full((batch, max_new), -1, dtype=torch.long, device=self.device)
        rows = torch.arange(batch, device=self.device)
        rounds = 0
        with self._session(batch, width + max_new, cfg.use_cache) as cache:
            for i in range(max_new):
                rounds += 1
                # Token i is predicted at column width + i - 1 (the last prompt token for i = 0).
                end = width + i
                lo = 0 if cache is None or i == 0 else end - 1
                ids = torch.cat([prompt_ids[rows, lo:width], tokens[rows, max(lo - width, 0): i]], dim=1)
                logits = self._forward(
                    ids, pos_all[rows, lo:end], meta_all[rows, :, lo:end], cache, commit=end - lo, keep_last=1
                )
                nxt = torch.zeros(rows.numel(), 1, dtype=torch.long, device=self.device)  # [N, 1]
                if logits is not None:
                    uniform = self._uniforms(batch, 1)  # [B, 1] or None
                    nxt = self._choose(logits, None if uniform is None else uniform[rows])[0]
                nxt = share_decisions(nxt, self.parallel)
                tokens[rows, i] = nxt[:, 0]
                step_map[rows, i] = 0
                done = torch.isin(nxt[:, 0], self._eos) | (i == limits[rows] - 1)  # [N]
                if bool(done.any()):
                    keep = (~done).nonzero()[:, 0]
                    rows = rows[keep]
                    if cache is not None:
                        cache.keep(keep)
                    if rows.numel() == 0:
                        break
        return self._finish(prompt_ids, prompt_lens, tokens, step_map, 1, limits, rounds, start)
