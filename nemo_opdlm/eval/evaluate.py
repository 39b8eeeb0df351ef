"""Generation-based evaluation of a block-diffusion student (or of the AR teacher) on a verifiable task.

One job: decode every example of a :class:`~nemo_opdlm.eval.tasks.Task` with the rollout engine
(``rollout.sampler.BlockSampler``: ``generate`` for block diffusion, static or dynamic;
``generate_ar`` for the causal teacher), score the answers, and report accuracy next to the
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

from nemo_opdlm.data.prompts import eos_ids, left_pad  # noqa: F401  (eos_ids: re-exported)
from nemo_opdlm.eval import tasks as T
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.student import parallel_of
from nemo_opdlm.rollout.sampler import BlockSampler, Rollout, SamplerConfig

MODES = ("ar", "static", "dynamic")


@dataclass(kw_only=True)
class DecodeSettings:
    """How the model decodes during evaluation (printed next to every score)."""

    mode: str = "static"
    """'ar' (causal next-token: the teacher), 'static' (block_size / steps_per_block tokens per
    round) or 'dynamic' (every position above ``threshold``, at least the static count)."""
    block_size: int = 4
    """Tokens per block (block diffusion only)."""
    steps_per_block: Optional[int] = None
    """Rounds per block; None = block_size (1 token per round in static mode: the paper's eval)."""
    threshold: float = 0.9
    """Dynamic mode's confidence threshold."""
    temperature: float = 0.0
    """0 = greedy (the paper's evaluation)."""
    max_new_tokens: int = 256
    """Generation length limit."""
    chat_template: str = "auto"
    """'auto' (use the tokenizer's when it has one), 'always' or 'never'."""
    num_fewshot: int = 0
    """Few-shot examples before each question (recorded here; the task holds them)."""
    batch_size: int = 16
    """Prompts decoded together."""
    use_cache: bool = True
    """Block KV cache (False: the uncached reference path)."""
    seed: int = 0
    """Sampler seed (only matters with temperature > 0)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"eval mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_size < 1:
            raise ConfigError(f"eval batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"eval max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mode != "ar" and self.block_size < 1:
            raise ConfigError(f"eval block_size must be >= 1, got {self.block_size}")
        if self.steps_per_block is not None and not 1 <= self.steps_per_block <= self.block_size:
            raise ConfigError(f"eval steps_per_block must be in [1, block_size={self.block_size}], got "
                              f"{self.steps_per_block}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"eval threshold must be in (0, 1], got {self.threshold}")
        if self.temperature < 0:
            raise ConfigError(f"eval temperature must be >= 0 (0 = greedy), got {self.temperature}")

    @property
    def rounds_per_block(self) -> int:
        return self.steps_per_block or self.block_size

    def describe(self) -> str:
        """One line with every setting that changes the score."""
        if self.mode == "ar":
            decode = "AR (causal, 1 token/forward)"
        elif self.mode == "static":
            decode = f"block={self.block_size} static {self.block_size // self.rounds_per_block} tok/round"
        else:
            decode = f"block={self.block_size} dynamic thr={self.threshold:g}"
        return (f"{decode} | gen={self.max_new_tokens} T={self.temperature:g} "
                f"chat={self.chat_template} fewshot={self.num_fewshot}")

    def sampler_config(self, *, mask_token_id: Optional[int], eos_token_ids: Sequence[int],
                       pad_token_id: Optional[int], shift_logits: bool = False) -> SamplerConfig:
        if self.mode == "ar":
            # The AR path never feeds [MASK]; any id outside the EOS set satisfies the config.
            mask = mask_token_id if mask_token_id is not None else next(
                i for i in range(len(eos_token_ids) + 1) if i not in eos_token_ids)
            return SamplerConfig(mask_token_id=mask, block_size=1, steps_per_block=1, mode="static",
                                 temperature=self.temperature, max_new_tokens=self.max_new_tokens,
                                 eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id,
                                 use_cache=self.use_cache, suppress_mask_token=False, seed=self.seed)
        if mask_token_id is None:
            raise ConfigError("block-diffusion evaluation needs the [MASK] token id (mask_token_id)")
        return SamplerConfig(
            mask_token_id=mask_token_id, block_size=self.block_size, steps_per_block=self.rounds_per_block,
            mode=self.mode, threshold=self.threshold, temperature=self.temperature,
            max_new_tokens=self.max_new_tokens, eos_token_ids=tuple(eos_token_ids), pad_token_id=pad_token_id,
            use_cache=self.use_cache, seed=self.seed, shift_logits=shift_logits,
        )


@dataclass
class EvalResult:
    """A task's score under one set of decoding settings."""

    task: str
    settings: dict[str, Any]
    num_examples: int
    num_correct: int
    tokens_generated: int
    row_rounds: int
    """Denoising rounds the rows needed (summed over rows and blocks)."""
    wall_time_s: float
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

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
        s = DecodeSettings(**self.settings)
        return (f"{self.task}: accuracy {self.accuracy:.4f} ({self.num_correct}/{self.num_examples}) | "
                f"tokens/round {self.tokens_per_round:.2f} | tokens/s {self.tokens_per_s:.1f} | {s.describe()}")

    def as_dict(self, with_samples: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not with_samples:
            out.pop("samples")
        out.update(accuracy=self.accuracy, tokens_per_round=self.tokens_per_round, tokens_per_s=self.tokens_per_s)
        return out


def row_rounds(rollout: Rollout) -> int:
    """Rounds each row needed, summed: per block holding a valid token, its last round + 1."""
    batch, length = rollout.tokens.shape
    bs = rollout.block_size
    steps = rollout.step_map.view(batch, length // bs, bs)  # [B, nb, bs]
    used = rollout.valid.view(batch, length // bs, bs).any(-1)  # [B, nb]
    return int(((steps.amax(-1) + 1).clamp(min=0) * used).sum())


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
    mask_token_id: Optional[int] = None,
    shift_logits: bool = False,
    eos_token_ids: Optional[Sequence[int]] = None,
    chat_kwargs: Optional[dict] = None,
    log: Optional[Callable[[str], None]] = None,
) -> EvalResult:
    """Decode and score every example of ``task``; the result is the same on every rank.

    ``mask_token_id`` and ``shift_logits`` describe the block-diffusion model (its checkpoint's
    ``DiffusionConfig``; see ``loading.load_model``); AR decoding ignores them.
    """
    chat = T.use_chat(tokenizer, settings.chat_template)
    eos = tuple(eos_token_ids) if eos_token_ids is not None else eos_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    sampler = BlockSampler(chunks, settings.sampler_config(mask_token_id=mask_token_id, eos_token_ids=eos,
                                                           pad_token_id=pad, shift_logits=shift_logits))
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
        if settings.mode == "ar":
            rollout = sampler.generate_ar(ids, lens)
        else:
            rollout = sampler.generate(ids, lens)
        wall += time.perf_counter() - start
        tokens += int(rollout.valid.sum())
        rounds += row_rounds(rollout)
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
        wall_time_s=wall, samples=samples,
    )


def format_table(results: Sequence[tuple[str, EvalResult]]) -> str:
    """A fixed-width table: one row per (label, result) with the settings that produced it."""
    head = f"{'model':<22} {'task':<10} {'accuracy':>9} {'tok/round':>10} {'tok/s':>9}  decoding"
    lines = [head, "-" * len(head) + "-" * 30]
    for label, r in results:
        lines.append(f"{label:<22} {r.task:<10} {r.accuracy:>9.3f} {r.tokens_per_round:>10.2f} "
                     f"{r.tokens_per_s:>9.1f}  {DecodeSettings(**r.settings).describe()}")
    return "\n".join(lines)
