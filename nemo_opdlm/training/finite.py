"""Non-finite numbers in training: which steps to skip, when to stop, and what never to save.

One job: decide from a step's numbers whether its update may be applied (loss and metrics, the
teacher's targets, the gradient norm), stop the run after ``train.max_nonfinite_in_row`` such steps
in a row, and refuse to checkpoint a student whose weights or optimizer state are not finite (a
checkpoint of NaNs would become ``latest`` and every resume would start from it). Non-goals:
computing the numbers (``step.py``, ``optim.py``), writing checkpoints (``checkpoint.py``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch

from nemo_opdlm.errors import NonFiniteLossError, NonFiniteStateError
from nemo_opdlm.runtime.comm import agree
from nemo_opdlm.training.optim import TrainState

TEACHER_NONFINITE = "teacher_nonfinite"
"""Reported metric: teacher target values that are NaN or +inf at the loss positions (a -inf
log-probability is a token of probability 0, legitimately)."""


def count_bad_targets(logprobs: torch.Tensor) -> torch.Tensor:
    """How many teacher log-probabilities are NaN or +inf (0-dim float tensor, for the metrics).

    The KL weights each term by ``p_T > 0``, which is False for NaN: without this count a NaN
    teacher trained silently with loss 0.
    """
    return (torch.isnan(logprobs) | torch.isposinf(logprobs)).sum().to(torch.float32)


def step_problem(metrics: dict[str, float]) -> Optional[str]:
    """Why this step's update must be skipped, judged from its reduced metrics, or None."""
    bad_targets = metrics.get(TEACHER_NONFINITE, 0.0)
    if bad_targets:
        return f"non-finite teacher targets ({bad_targets:.0f} values: check the teacher's weights)"
    if not all(math.isfinite(v) for v in metrics.values()):
        return "non-finite loss"
    return None


class NonFiniteSteps:
    """Counts skipped steps in a row; notes each; raises at ``limit`` (``train.max_nonfinite_in_row``)."""

    def __init__(self, limit: int, note: Callable[[str], None]) -> None:
        self.limit, self.note, self.in_row = limit, note, 0

    def record(self, step: int, problem: Optional[str]) -> None:
        """``problem``: why ``step``'s update was skipped (the same on every rank), or None if applied."""
        if problem is None:
            self.in_row = 0
            return
        self.in_row += 1
        self.note(f"step {step}: {problem}, update skipped ({self.in_row} in a row)")
        if self.in_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_row} consecutive non-finite steps, the last at step {step}: {problem} "
                f"(train.max_nonfinite_in_row={self.limit}); the last checkpoint is kept: lower optim.lr "
                "or check the data and the teacher")


def agreed_problem(problem: Optional[str], fallback: str) -> Optional[str]:
    """``problem`` if any rank has one (collective); ranks without their own get ``fallback``."""
    return (problem or fallback) if agree(problem is not None) else None


def _named_state(state: TrainState) -> Iterator[tuple[str, torch.Tensor]]:
    """(what, tensor) for every floating-point tensor a checkpoint holds from this rank."""
    for chunk in state.chunks:
        for name, p in chunk.named_parameters():
            yield f"weight {name.replace('module.', '')}", p
    for inner in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        torch_opt = inner.optimizer
        for g, group in enumerate(torch_opt.param_groups):
            for i, p in enumerate(group["params"]):
                yield f"optimizer main weight {g}.{i}", p
                for key, value in torch_opt.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        yield f"optimizer {key} {g}.{i}", value


def nonfinite_state(state: TrainState) -> Optional[str]:
    """Where this rank's student weights / optimizer state hold NaN or inf, in words, or None."""
    named, seen = [], set()
    for what, t in _named_state(state):  # an fp32 model's parameters are also the optimizer's: once
        if t.is_floating_point() and t.numel() and id(t) not in seen:
            seen.add(id(t))
            named.append((what, t))
    if not named:
        return None
    counts = torch.stack([(~torch.isfinite(t.detach())).sum() for _, t in named]).cpu()
    if not int(counts.sum()):
        return None
    bad = [(what, int(n), t.numel()) for (what, t), n in zip(named, counts) if n]
    first = ", ".join(f"{what}: {n} of {size} values" for what, n, size in bad[:2])
    return f"{len(bad)} of {len(named)} tensors hold NaN/inf ({first}{', ...' if len(bad) > 2 else ''})"


def check_saveable(state: TrainState, step: int, kept: Optional[str]) -> None:
    """Raise :class:`NonFiniteStateError` (on every rank) if any rank's state is not finite.

    ``kept``: the checkpoint ``latest`` names now, which stays the one to resume from.
    """
    problem = agreed_problem(nonfinite_state(state), "another rank's weights or optimizer state hold NaN/inf")
    if problem is None:
        return
    raise NonFiniteStateError(
        f"not saving step {step}: the student's weights or optimizer state are not finite ({problem}); "
        f"{'the last good checkpoint ' + kept + ' stays latest' if kept else 'no checkpoint is written'}. "
        "The run diverged: lower optim.lr, or check the data and the teacher")
