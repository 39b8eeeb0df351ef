"""On-policy rollouts: the student decodes its own responses block by block (see sampler.py).

The names below are imported on first use, so that reading ``rollout.schedules`` (the config does,
to validate the curriculum) does not import megatron-core through the sampler.
"""

import importlib

_EXPORTS = {
    "BlockKVCache": "kv_cache", "BlockSampler": "sampler", "Rollout": "sampler", "RolloutMetrics": "sampler",
    "SamplerConfig": "sampler", "left_pad": "sampler", "LengthCurriculum": "schedules", "DecodeConfig": "decode",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nemo_opdlm.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nemo_opdlm.rollout.{_EXPORTS[name]}"), name)
