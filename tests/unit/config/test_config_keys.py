"""The config keys users' YAML files and ``key=value`` overrides depend on are frozen: a renamed,
added or removed key fails here until ``tests/config_keys.txt`` is updated on purpose."""

import os

from nemo_opdlm.config import config_keys

FROZEN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "config_keys.txt")


def test_config_keys_are_frozen():
    with open(FROZEN) as f:
        frozen = [line.strip() for line in f if line.strip()]
    now = config_keys()
    added, removed = sorted(set(now) - set(frozen)), sorted(set(frozen) - set(now))
    assert not added and not removed, (
        f"config keys changed: added {added}, removed {removed}. Users' YAML files and command lines use "
        f"these names: if the change is deliberate, update {FROZEN} (and say so in the README)")
    assert len(now) == len(set(now))


def test_config_keys_reach_every_section():
    keys = config_keys()
    for key in ("rollout.threshold", "rollout.steps_per_block", "diffusion.shift_logits", "optim.lr",
                "train.save_dir", "parallel.tp", "data.path", "init.teacher_hf", "distill.method"):
        assert key in keys
