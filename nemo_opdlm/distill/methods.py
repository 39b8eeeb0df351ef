"""The training methods as data: where a step's responses come from, how its states are masked, its loss.

One job: describe every ``distill.method`` by the three choices the training step composes
(``training/step.py``), so that no module tests method names. Non-goals: running any of it.

| method        | responses                                   | masking   | loss      |
|---------------|---------------------------------------------|-----------|-----------|
| ``opdlm``     | the student's own rollouts                  | on_policy | kl        |
| ``random_mask`` | the student's own rollouts ("OPDLM off")  | random    | kl        |
| ``off_policy``| the dataset's, else the teacher's own AR rollouts | random | kl       |
| ``sft``       | the dataset's                               | random    | ce        |
| ``ar``        | the dataset's (trains an AR model: the demo's teacher) | none: causal rows | causal_ce |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nemo_opdlm.errors import ConfigError

RESPONSES = ("own_rollouts", "teacher", "dataset")
LOSSES = ("kl", "ce", "causal_ce")


@dataclass(frozen=True, kw_only=True)
class Method:
    """One ``distill.method``."""

    name: str
    responses: str
    """'own_rollouts' (the student decodes them), 'teacher' (the dataset's responses when the file has
    them, else the teacher's own causal rollouts) or 'dataset' (``data.response_field`` required)."""
    masking: Optional[str]
    """'on_policy' (from the rollout's step_map), 'random', or None: causal ``[prompt | response]``
    rows without xt (block size 1)."""
    loss: str
    """'kl' (to the teacher's shifted targets), 'ce' (masked-diffusion cross-entropy on x0) or
    'causal_ce' (next-token cross-entropy)."""
    summary: str

    def __post_init__(self) -> None:
        assert self.responses in RESPONSES and self.loss in LOSSES, self
        assert self.masking in ("on_policy", "random", None), self
        assert (self.masking == "on_policy") <= (self.responses == "own_rollouts"), "on-policy masks need a step_map"

    @property
    def needs_teacher(self) -> bool:
        """Its loss or its responses come from the teacher."""
        return self.loss == "kl" or self.responses == "teacher"

    @property
    def needs_dataset_responses(self) -> bool:
        return self.responses == "dataset"

    @property
    def causal(self) -> bool:
        """Rows are causal ``[prompt | response]`` (no xt): an AR model is trained."""
        return self.masking is None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method(name="opdlm", responses="own_rollouts", masking="on_policy", loss="kl",
           summary="own rollouts, one state per block from the decoding trajectory, forward KL (the paper)"),
    Method(name="random_mask", responses="own_rollouts", masking="random", loss="kl",
           summary="own rollouts with random per-block masks, forward KL ('OPDLM off')"),
    Method(name="off_policy", responses="teacher", masking="random", loss="kl",
           summary="teacher responses (the dataset's, else the teacher's own rollouts), random masks, KL"),
    Method(name="sft", responses="dataset", masking="random", loss="ce",
           summary="dataset responses, random masks, masked-diffusion cross-entropy"),
    Method(name="ar", responses="dataset", masking=None, loss="causal_ce",
           summary="causal next-token pre-training on dataset responses (an AR teacher)"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"distill.method must be one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]
