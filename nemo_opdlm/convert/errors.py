"""Errors raised by the Hugging Face <-> Megatron converters.

One job: name each way a conversion can be refused, so that callers (and tests) can tell them
apart. Every message says what was found and what to do about it.
"""

from __future__ import annotations

from nemo_opdlm.errors import CheckpointError, ConvertError  # noqa: F401  (ConvertError re-exported)


class UnsupportedArchitectureError(ConvertError):
    """The HF config names an architecture (or an architecture feature) this converter lacks."""


class CheckpointFileError(ConvertError, CheckpointError):
    """A checkpoint file is missing, truncated or inconsistent with its index (a ``CheckpointError``
    met while converting or loading weights)."""


class TargetExistsError(ConvertError):
    """The output directory exists and overwrite was not requested."""


class VocabMismatchError(ConvertError):
    """Two vocabularies that must agree (teacher/student, tokenizer/embedding) do not."""


class ArchitectureMismatchError(ConvertError, CheckpointError):
    """Two descriptions of one model disagree on an architecture field (a checkpoint and the HF
    directory named as its source, a run's model config and the weights it loads)."""


class ServingLayoutError(ConvertError):
    """The student does not fit the layout the serving engines load (``--format sdar``): the wrong
    family, [MASK] id, logit alignment or block grid."""
