"""On-policy rollouts: decoding with the student's own (training) weights, every decision recorded.

One job: the sampler a caller builds once per model and decoding config, and calls with left-padded
prompts: it owns the random stream, the decode session (eval mode, no grad, the KV cache) and the
pieces every decoder shares (micro-batching through the pipeline stages, choosing tokens, sharing
the last stage's decisions), and hands the rows to the decoder the config asks for:

- ``cached.py``: block diffusion with the block KV cache, rows asynchronous (the default);
- ``lockstep.py``: block diffusion without a cache, rows in lockstep (the reference);
- ``ar.py``: causal next-token decoding (``DecodeConfig.mode='ar'``: the AR teacher).

Each result records the round at which every token was unmasked (``step_map``), its block, and
validity. Non-goals: turning rollouts into training rows (``distill/states.py``), the rollout length
(``schedules.LengthCurriculum``), per-row bookkeeping (``rows.py``).

Decoding, per row and block ``b``: the block starts as ``block_size`` [MASK] tokens; each round
runs the model over the block, picks a candidate and a confidence per position (``sampling.py``)
and unmasks some positions (``schedules.py``): ``static`` the k most confident, ``dynamic`` every
one above the threshold and at least k. The block ends when nothing is masked. A row whose block
holds an EOS (or that reached the length limit) is finished; it is dropped from the batch (and the
KV cache) so that it costs nothing more, and its later tokens are padding. Attention follows
``masks.build_layout`` of ``[prompt | response]`` exactly as training does.

Under TP every rank computes the same decisions from vocab-parallel logits (same random stream);
under PP the last stage decides and broadcasts, and rounds pass micro-batches through the stages.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from nemo_opdlm.data.prompts import left_pad  # noqa: F401  (nemo_opdlm.rollout.left_pad)
from nemo_opdlm.models import grid
from nemo_opdlm.rollout import rows as R
from nemo_opdlm.rollout.ar import decode_ar
from nemo_opdlm.rollout.cached import decode_cached
from nemo_opdlm.rollout.decode import DecodeConfig
from nemo_opdlm.rollout.engine import DecodeEngine, SamplerConfig, rollout_mode  # noqa: F401  (their old home)
from nemo_opdlm.rollout.lockstep import decode_lockstep
from nemo_opdlm.rollout.schedules import BlockSchedule


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
            On the absolute grid a row's first block starts with its prompt's last ``P mod b``
            tokens, so its last columns are padding.
        step_map: ``[B, L]`` round within its block at which each token was unmasked; -1 where
            nothing was decoded.
        block_index: ``[B, L]`` block of each response position, counted from the first denoising
            block (on the absolute grid, position ``i`` of a row whose prompt has ``P`` tokens is in
            block ``(P mod b + i) // b``).
        valid: ``[B, L]`` True for real response tokens: decoded, up to and including the first
            EOS, and within ``max_new_tokens``; False = padding.
        finished_eos: ``[B]`` the row ended with an EOS.
        schedule: how its blocks were decoded (block size, 1 for AR decoding; grid; rounds per block;
            threshold): what the states cut and the export states.
        metrics: see :class:`RolloutMetrics`.
    """

    prompt_ids: Tensor
    prompt_lens: Tensor
    tokens: Tensor
    step_map: Tensor
    block_index: Tensor
    valid: Tensor
    finished_eos: Tensor
    schedule: BlockSchedule
    metrics: RolloutMetrics = field(repr=False)

    @property
    def block_size(self) -> int:
        return self.schedule.block_size

    @property
    def block_grid(self) -> str:
        return self.schedule.block_grid

    @property
    def row_rounds(self) -> int:
        """Rounds that committed a response token, summed over rows and blocks (``tokens_per_round``'s
        denominator; ``rows.rows_rounds``)."""
        return R.rows_rounds(self.step_map, self.valid, self.block_index, self.block_size)


class BlockSampler(DecodeEngine):
    """Decodes with this rank's model chunks (the training weights) under a :class:`SamplerConfig`:
    the engine (``engine.py``: its random stream, KV cache and shared machinery) plus the choice of
    decoder and the ``Rollout`` it returns.
    """

    def generate(self, prompt_ids: Tensor, prompt_lens: Tensor, max_new_tokens: Optional[int | Tensor] = None,
                 static_rows: Optional[Tensor] = None) -> Rollout:
        """Responses for left-padded ``prompt_ids [B, P]`` with lengths ``prompt_lens [B]``, decoded as
        ``config.decode`` says (block diffusion, static or dynamic; or AR).

        ``max_new_tokens`` overrides the config (e.g. from the length curriculum): one limit, or one
        per row (``[B]``, e.g. ``rollout.max_length_by_domain``; a row stops at its own limit and
        the response width is the longest). ``static_rows`` (``[B]`` bool, dynamic mode only):
        these rows decode with the static rule (the scheduled count per round, no threshold), the
        others with the threshold, in the same forwards (``rollout.static_fraction``). Every rank of
        the model-parallel group must call this with the same prompts.
        """
        cfg = self.config
        start = time.perf_counter()
        prompt_ids, prompt_lens = self._check_prompts(prompt_ids, prompt_lens)
        limits, longest = R.row_limits(cfg.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                       prompt_ids.shape[0], self.device)
        if cfg.decode.mode == "ar":
            tokens, step_map, rounds = decode_ar(self, prompt_ids, prompt_lens, limits, longest)
            return self._finish(prompt_ids, prompt_lens, tokens, step_map, limits, rounds, start,
                                head=torch.zeros_like(prompt_lens))
        if cfg.shift_logits and int(prompt_lens.min()) < 1:
            raise ValueError("a shifted model needs a non-empty prompt in every row: it predicts the first "
                             "response token from the last prompt token")
        if static_rows is not None and static_rows.shape != prompt_lens.shape:
            raise ValueError(f"static_rows must have shape {tuple(prompt_lens.shape)}, got {tuple(static_rows.shape)}")
        d = R.RowRecords(prompt_ids, prompt_lens, limits, longest, schedule=cfg.schedule, static_rows=static_rows,
                         pad_id=cfg.pad_id, eos=self.eos, draw=self.draw)
        rounds = decode_cached(self, d) if cfg.decode.use_cache else decode_lockstep(self, d)
        tokens, step_map = d.responses()
        return self._finish(prompt_ids, prompt_lens, tokens, step_map, limits, rounds, start, head=d.head)

    def _check_prompts(self, prompt_ids: Tensor, prompt_lens: Tensor) -> tuple[Tensor, Tensor]:
        if prompt_ids.dim() != 2 or prompt_lens.shape != (prompt_ids.shape[0],):
            raise ValueError(
                f"prompt_ids must be [B, P] and prompt_lens [B]; got {tuple(prompt_ids.shape)}, "
                f"{tuple(prompt_lens.shape)}"
            )
        if prompt_ids.shape[0] == 0:
            raise ValueError("empty batch")
        return prompt_ids.to(self.device), prompt_lens.to(self.device)

    def _finish(self, prompt_ids: Tensor, prompt_lens: Tensor, tokens: Tensor, step_map: Tensor, limits: Tensor,
                rounds: int, start: float, head: Tensor) -> Rollout:
        block_size = self.config.schedule.block_size
        block_index = grid.block_index(head, tokens.shape[1], block_size)  # [B, L]
        valid, finished = R.valid_mask(tokens, step_map, self.eos, limits)
        n_tokens = int(valid.sum())
        wall = time.perf_counter() - start
        metrics = RolloutMetrics(
            tokens_generated=n_tokens,
            rounds=rounds,
            tokens_per_round=n_tokens / max(R.rows_rounds(step_map, valid, block_index, block_size), 1),
            frac_finished_eos=float(finished.float().mean()),
            wall_time_s=wall,
            tokens_per_s=n_tokens / max(wall, 1e-9),
        )
        return Rollout(
            prompt_ids=prompt_ids, prompt_lens=prompt_lens, tokens=tokens, step_map=step_map,
            block_index=block_index, valid=valid, finished_eos=finished, schedule=self.config.schedule,
            metrics=metrics,
        )


def with_mode(decode: DecodeConfig, mode: str) -> DecodeConfig:
    """``decode``'s settings as a plain :class:`DecodeConfig` in another mode (e.g. the teacher's AR
    rollouts under the run's sampling settings)."""
    fields = {f.name: getattr(decode, f.name) for f in dataclasses.fields(DecodeConfig)}
    return DecodeConfig(**dict(fields, mode=mode))
