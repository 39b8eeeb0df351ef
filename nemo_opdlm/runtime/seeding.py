"""Every seed a run derives from ``train.seed``, in one place.

One job: the arithmetic that turns the run's base seed into the seed of each random stream (a
step, a pipeline stage, a data-parallel rank's rollout and noise, a data epoch), and the seeding
of the global generators. A resumed run repeats an uninterrupted one exactly because each stream is
a function of (base seed, step, rank), never of what ran before; changing a formula here changes
every run's numbers, so the formulas are fixed.

Non-goals: which generator a module draws from (each module owns its ``torch.Generator``).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from nemo_opdlm.runtime.context import ParallelContext

_PRIME = 1_000_003


def step_seed(base: int, step: int) -> int:
    """The seed of training step ``step`` (rollout, states and model RNG all start from it)."""
    return base * _PRIME + step * 7919


def stage_seed(seed: int, pp_rank: int) -> int:
    """Pipeline stages draw different streams (dropout, init), as megatron-core's training does."""
    return seed + 100 * pp_rank


def rollout_seed(seed: int, dp_rank: int) -> int:
    """A data-parallel rank's sampler stream (TP and PP peers share it: they decide together)."""
    return seed + _PRIME * dp_rank


def noise_seed(seed: int, dp_rank: int) -> int:
    """A data-parallel rank's stream for the training states' masks (``distill/states.py``)."""
    return seed + 31 * dp_rank


def epoch_seed(seed: int, epoch: int) -> int:
    """The prompt order of data epoch ``epoch`` (the same on every rank; ranks take disjoint slices)."""
    return seed * _PRIME + epoch


def demo_train_seed(seed: int) -> int:
    """``train.seed`` of the demo's and the benchmarks' runs for their ``--seed``."""
    return 1234 + seed


def seed_everything(seed: int, ctx: ParallelContext) -> None:
    """Seed Python, NumPy, torch and megatron-core's model-parallel RNG tracker for this rank.

    The tracker gives TP ranks distinct streams inside TP regions (dropout) and the same stream
    elsewhere; pipeline stages get ``stage_seed``.
    """
    from megatron.core import tensor_parallel

    seed = stage_seed(seed, ctx.pp_rank)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
