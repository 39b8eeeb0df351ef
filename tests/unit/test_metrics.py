"""metrics.jsonl is strict JSON: a skipped step's NaN loss is written as null."""

from __future__ import annotations

import json
import math

from nemo_opdlm.training.metrics import json_line


def _strict(line: str) -> dict:
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_values_are_null():
    row = _strict(json_line({"step": 3, "loss": math.nan, "grad_norm": math.inf, "kl": 0.25}))
    assert row == {"step": 3, "loss": None, "grad_norm": None, "kl": 0.25}
    assert _strict(json_line({"step": 1, "loss": 1.5})) == {"step": 1, "loss": 1.5}
