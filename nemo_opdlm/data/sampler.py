"""The order prompts are served in: deterministic shuffling, data-parallel sharding, resumable cursor.

One job: decide which examples each data-parallel rank gets at each step. A step consumes one
GLOBAL batch of ``global_batch_size`` consecutive examples of the epoch's permutation (seeded by
``seed`` and the epoch); DP rank r takes the r-th of ``dp_size`` equal slices, so ranks get disjoint
prompts and the global batch does not depend on the DP size. An epoch's tail smaller than a global
batch is skipped. The cursor (epoch, position) is global: a run resumed from ``state_dict()``, even at
another DP size, continues with exactly the prompts an uninterrupted run would get. Non-goals:
reading and tokenizing (``prompts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from nemo_opdlm.data.prompts import PromptSet, left_pad, right_pad
from nemo_opdlm.errors import DataError
from nemo_opdlm.runtime.seeding import epoch_seed


class ShardedSampler:
    """Global batches of example indices, sliced per data-parallel rank."""

    def __init__(self, num_examples: int, *, global_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise DataError(f"global batch size {global_batch_size} must be a positive multiple of the "
                            f"data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if num_examples < global_batch_size:
            raise DataError(f"the dataset has {num_examples} usable prompts, fewer than one global batch "
                            f"of {global_batch_size}: lower the batch size or add prompts")
        self.num_examples = num_examples
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._perm: Optional[torch.Tensor] = None
        self._perm_epoch = -1

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch`` ``[N]`` (the same on every rank)."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
                self._perm = torch.randperm(self.num_examples, generator=g)
            else:
                self._perm = torch.arange(self.num_examples)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def next_indices(self) -> list[int]:
        """This rank's example indices for the next step; advances the cursor."""
        if self.position + self.global_batch_size > self.num_examples:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.dp_rank * self.local_batch_size
        picked = self.permutation(self.epoch)[start:start + self.local_batch_size]
        self.position += self.global_batch_size
        return picked.tolist()

    def state_dict(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, shuffle=self.shuffle,
                    num_examples=self.num_examples, global_batch_size=self.global_batch_size)

    CURSOR_FIELDS = {"num_examples": "the usable prompts of data.path", "global_batch_size": "train.prompts_per_step",
                     "seed": "train.seed", "shuffle": "the shuffling"}
    """What a saved cursor depends on, and the config that decides each (for the refusal)."""
    CURSOR_KEYS = {"num_examples": "data.path", "global_batch_size": "train.prompts_per_step", "seed": "train.seed"}
    """The config key to set back for each (the shuffling is not configurable)."""

    def mismatches(self, state: dict[str, Any]) -> dict[str, str]:
        """``key -> "what: saved when saved, now now"`` for each thing a saved cursor depends on that
        differs now (empty: it can be resumed). Checked at resume before any model is built
        (``training.setup.check_data_cursor``)."""
        return {key: f"{what}: {state[key]} when saved, {getattr(self, key)} now"
                for key, what in self.CURSOR_FIELDS.items() if state[key] != getattr(self, key)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved cursor; the dataset, seed and global batch must be the same."""
        differ = self.mismatches(state)
        if differ:
            raise DataError(f"cannot resume the data cursor ({'; '.join(differ.values())}): the same dataset, "
                            "filter, seed and batch are needed")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass(frozen=True)
class PromptBatch:
    """One rank's prompts for a step (left-padded) and their optional responses (right-padded)."""

    indices: list[int]
    """Rows of the source dataset."""
    prompt_ids: torch.Tensor
    """``[b, P]`` left-padded prompt tokens."""
    prompt_lens: torch.Tensor
    """``[b]`` true prompt lengths."""
    response_ids: Optional[torch.Tensor] = None
    """``[b, L]`` right-padded reference responses (closed by EOS), or None."""
    response_lens: Optional[torch.Tensor] = None
    """``[b]`` response lengths, or None."""
    domains: Optional[list[str]] = None
    """Each prompt's domain (``data.domain_field``), or None."""


class PromptLoader:
    """A :class:`PromptSet` served through a :class:`ShardedSampler` as padded tensors."""

    def __init__(self, prompts: PromptSet, sampler: ShardedSampler, pad_id: int) -> None:
        if sampler.num_examples != len(prompts):
            raise DataError(f"sampler built for {sampler.num_examples} examples, dataset has {len(prompts)}")
        self.prompts, self.sampler, self.pad_id = prompts, sampler, pad_id

    def next_batch(self) -> PromptBatch:
        picked = [self.prompts.examples[i] for i in self.sampler.next_indices()]
        prompt_ids, prompt_lens = left_pad([e.prompt_ids for e in picked], self.pad_id)
        response_ids = response_lens = None
        if picked[0].response_ids is not None:
            response_ids, response_lens = right_pad([e.response_ids for e in picked], self.pad_id)
        domains = None if picked[0].domain is None else [str(e.domain) for e in picked]
        return PromptBatch([e.index for e in picked], prompt_ids, prompt_lens, response_ids, response_lens, domains)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
