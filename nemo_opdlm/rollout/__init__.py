"""On-policy rollouts: the student decodes its own responses block by block (see sampler.py)."""

from nemo_opdlm.rollout.kv_cache import BlockKVCache
from nemo_opdlm.rollout.sampler import BlockSampler, Rollout, RolloutMetrics, SamplerConfig, left_pad
from nemo_opdlm.rollout.schedules import LengthCurriculum

__all__ = [
    "BlockKVCache", "BlockSampler", "LengthCurriculum", "Rollout", "RolloutMetrics", "SamplerConfig", "left_pad",
]
