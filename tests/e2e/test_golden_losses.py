"""Golden losses: a few steps of every method on the tiny run, against the numbers committed in
``tests/assets/losses/tiny_methods.json`` (as torchtitan's ``tests/assets/losses``), so that the quick
tier catches a change that moves the numbers (a refactor must not).

One thread, fixed seeds: the rollouts sample at temperature 1, so the same arithmetic gives the same
tokens. A deliberate change of the numbers regenerates the file::

    OPDLM_REGENERATE_GOLDEN=1 python -m pytest tests/e2e/test_golden_losses.py

and says why in its commit.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from nemo_opdlm.distill.methods import METHODS
from nemo_opdlm.training.loop import train
from tests.train_fixtures import make_run

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "losses",
                      "tiny_methods.json")
KEYS = ("loss", "kl", "ce", "grad_norm", "rollout/tokens_generated", "train/loss_tokens")
"""What each step records (the ones a method has)."""


def _history(tmp_path, method: str) -> list[dict[str, float]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(make_run(str(tmp_path), f"distill.method={method}", "train.save_dir=null", "train.steps=3"))
    finally:
        torch.set_num_threads(threads)
    return [{k: h[k] for k in KEYS if k in h} for h in run["history"]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_few_steps_give_the_committed_losses(tmp_path, method):
    got = _history(tmp_path, method)
    if os.environ.get("OPDLM_REGENERATE_GOLDEN"):
        data = json.load(open(GOLDEN)) if os.path.isfile(GOLDEN) else {}
        data[method] = got
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(dict(sorted(data.items())), f, indent=1)
        pytest.skip("golden losses regenerated")
    want = json.load(open(GOLDEN))[method]
    assert [sorted(h) for h in got] == [sorted(h) for h in want]
    for step, (g, w) in enumerate(zip(got, want), 1):
        for key in w:
            assert math.isclose(g[key], w[key], rel_tol=1e-5, abs_tol=1e-7), (method, step, key, g[key], w[key])
