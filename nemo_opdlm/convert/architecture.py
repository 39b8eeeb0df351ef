"""Architecture discovery: which model a directory of weights holds.

One job: read the architecture (a ``ModelConfig``) off an HF directory's config.json or off the model
config a megatron-core checkpoint recorded, whichever the directory is, as Megatron-Bridge's
AutoBridge does. It sits above both readers (``hf_config.py``, ``checkpoint/format.py``), which do not
know each other. Non-goals: converting weights (``hf_to_mcore.py``, ``mcore_to_hf.py``).
"""

from __future__ import annotations

import os
from typing import Any

from nemo_opdlm.checkpoint.format import read_checkpoint_meta
from nemo_opdlm.convert import hf_config as hfc
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.config import ModelConfig
from nemo_opdlm.models.describe import model_config_from_dict


def model_config_of_weights(path: str, key: str, **overrides: Any) -> ModelConfig:
    """The architecture of the weights at ``path`` (named by config key ``key`` in errors): an HF
    directory's config.json, or the model config a megatron checkpoint recorded (``opdlm_convert.json``
    of ``tools/import_hf.py`` and of every trainer step). What Megatron-Bridge's AutoBridge reads: a
    run that leaves ``model`` out gets exactly the checkpoint's shape, RoPE, norm epsilon and tying.
    ``overrides``: fields set on what is read (e.g. ``linear_impl='local'``, to read a checkpoint
    trained with Transformer Engine where it is absent)."""
    if not os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is not a directory, so the model's architecture cannot be read from "
                          "it: fix the path, or set the model.* fields")
    if os.path.isfile(os.path.join(path, "config.json")):
        hf = hfc.read_hf_config(path)
        try:
            return hfc.model_config_from_hf(hf, **overrides)
        except KeyError as err:
            raise ConfigError(f"{path}/config.json ({key}) lacks {err.args[0]!r}: not a complete "
                              f"{'/'.join(hfc.supported_architectures())} config") from None
    meta = read_checkpoint_meta(path) or {}
    if not meta.get("model_config"):
        raise ConfigError(f"{key}: {path} has neither a config.json nor a recorded model config "
                          "(opdlm_convert.json): set the model.* fields")
    return model_config_from_dict(dict(meta["model_config"], **overrides))
