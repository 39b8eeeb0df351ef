"""Generation-based evaluation of a block-diffusion student (or of the AR teacher) on a verifiable task.

One job: decode every example of a :class:`~nemo_opdlm.eval.tasks.Task` with the rollout engine
(``rollout.sampler.BlockSampler``: ``generate`` for block diffusion, static or dynamic;
``mode="ar"`` for the causal teacher), score the answers, and report accuracy next to the
parallelism (tokens per round) and throughput (tokens/s) and the decoding settings that produced
them. Non-goals: loading models (``cli.py``), task files and answer matching (``tasks.py``).

Every rank of a model-parallel group calls :func:`evaluate` with the same task; data-parallel
ranks score disjoint shards (example ``i`` on DP rank ``i % dp``) and the totals are gathered.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from nemo_opdlm.data.prompts import eos_ids, left_pad, pad_id
from nemo_opdlm.eval import tasks as T
from nemo_opdlm.eval.settings import DecodeSettings
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.models.student import parallel_of
from nemo_opdlm.rollout.sampler import BlockSampler, Rollout

@dataclass
class EvalResult:
    """A task's score under one set of decoding settings."""

    task: str
    settings: dict[str, Any]
    num_examples: int
    num_correct: int
    tokens_generated: int
    row_rounds: int
    """Denoising rounds that committed a response token (summed over rows and blocks)."""
    wall_time_s: float
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)
    block_grid: Optional[str] = None
    """Where the blocks fell (``DiffusionConfig.block_grid``); None for AR decoding."""

    @property
    def accuracy(self) -> float:
        return self.num_correct / max(self.num_examples, 1)

    @property
    def tokens_per_round(self) -> float:
        return self.tokens_generated / max(self.row_rounds, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / max(self.wall_time_s, 1e-9)

    def summary(self) -> str:
        return (f"{self.task}: accuracy {self.accuracy:.4f} ({self.num_correct}/{self.num_examples}) | "
                f"tokens/round {self.tokens_per_round:.2f} | tokens/s {self.tokens_per_s:.1f} | {self.decoding()}")

    def decoding(self) -> str:
        """The settings that produced the score, in one line (the grid beside the block size)."""
        line = DecodeSettings(**self.settings).describe()
        if self.block_grid is None:
            return line
        head, sep, rest = line.partition(" | ")
        return f"{head} grid={self.block_grid}{sep}{rest}"

    def as_dict(self, with_samples: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not with_samples:
            out.pop("samples")
        out.update(accuracy=self.accuracy, tokens_per_round=self.tokens_per_round, tokens_per_s=self.tokens_per_s)
        return out


def decode_responses(rollout: Rollout, tokenizer, eos: Sequence[int]) -> list[str]:
    """Response text per row: valid tokens without the closing EOS."""
    out = []
    for tok, valid in zip(rollout.tokens.tolist(), rollout.valid.tolist()):
        ids = [t for t, v in zip(tok, valid) if v and t not in eos]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def evaluate(
    chunks: Sequence[torch.nn.Module],
    tokenizer,
    task: T.Task,
    settings: DecodeSettings,
    *,
    diffusion: Optional[DiffusionConfig] = None,
    eos_token_ids: Optional[Sequence[int]] = None,
    chat_kwargs: Optional[dict] = None,
    log: Optional[Callable[[str], None]] = None,
) -> EvalResult:
    """Decode and score every example of ``task``; the result is the same on every rank.

    ``diffusion`` describes the block-diffusion model (its checkpoint's ``DiffusionConfig``: block
    size, [MASK] id, logit alignment; see ``loading.LoadedModel.diffusion``); AR decoding needs none.
    """
    settings = settings.for_model(diffusion)
    chat = T.use_chat(tokenizer, settings.chat_template)
    eos = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids(tokenizer)
    pad = pad_id(tokenizer)
    sampler = BlockSampler(chunks, settings.sampler_config(diffusion=diffusion, eos_token_ids=eos, pad_token_id=pad))
    parallel = parallel_of(chunks)
    dp_rank, dp_size, dp_group = parallel.dp_rank, parallel.dp_size, parallel.dp_group
    mine = list(range(dp_rank, len(task.examples), dp_size))
    prompts = [T.build_prompt(task, task.examples[i], tokenizer, chat=chat, chat_kwargs=chat_kwargs) for i in mine]
    enc = tokenizer(prompts, add_special_tokens=not chat)["input_ids"] if prompts else []
    samples: list[dict[str, Any]] = []
    tokens = rounds = 0
    wall = 0.0
    for lo in range(0, len(mine), settings.batch_size):
        ids, lens = left_pad(enc[lo: lo + settings.batch_size], pad)
        start = time.perf_counter()
        rollout = sampler.generate(ids, lens)
        wall += time.perf_counter() - start
        tokens += int(rollout.valid.sum())
        rounds += rollout.row_rounds
        for j, text in enumerate(decode_responses(rollout, tokenizer, eos)):
            idx = mine[lo + j]
            ex = task.examples[idx]
            sc = T.score(task, text, ex.gold, chat=chat)
            samples.append({"index": idx, "question": ex.question, "generation": text, "extracted": sc.extracted,
                            "gold": ex.gold, "correct": sc.correct})
        if log is not None and dp_rank == 0:
            done = min(lo + settings.batch_size, len(mine))
            acc = sum(s["correct"] for s in samples) / max(len(samples), 1)
            log(f"  [{task.name} {settings.mode}] {done}/{len(mine)} acc so far {acc:.3f}")
    if dp_size > 1:
        gathered: list[Any] = [None] * dp_size
        torch.distributed.all_gather_object(gathered, (samples, tokens, rounds, wall), group=dp_group)
        samples = sorted((s for g in gathered for s in g[0]), key=lambda s: s["index"])
        tokens = sum(g[1] for g in gathered)
        rounds = sum(g[2] for g in gathered)
        wall = max(g[3] for g in gathered)
    return EvalResult(
        task=task.name, settings=asdict(settings), num_examples=len(samples),
        num_correct=sum(bool(s["correct"]) for s in samples), tokens_generated=tokens, row_rounds=rounds,
        wall_time_s=wall, samples=samples, block_grid=sampler.config.schedule.block_grid if settings.mode != "ar" else None,
    )


TOKENS_PER_ROUND_NOTE = ("tok/round: response tokens (up to EOS) / denoising rounds that committed one; "
                         "static 1 tok/round and AR read 1.00")
"""The table's definition of tok/round, printed above its header."""


def format_table(results: Sequence[tuple[str, EvalResult]]) -> str:
    """A fixed-width table: one row per (label, result) with the settings that produced it, under a
    line that defines tok/round (:func:`~nemo_opdlm.rollout.rows.rows_rounds`)."""
    head = f"{'model':<22} {'task':<10} {'accuracy':>9} {'tok/round':>10} {'tok/s':>9}  decoding"
    lines = [TOKENS_PER_ROUND_NOTE, head, "-" * len(head) + "-" * 30]
    for label, r in results:
        lines.append(f"{label:<22} {r.task:<10} {r.accuracy:>9.3f} {r.tokens_per_round:>10.2f} "
                     f"{r.tokens_per_s:>9.1f}  {r.decoding()}")
    return "\n".join(lines)
