"""Errors raised by the checkpoint wing: damaged files, an occupied target, weights of another model.

One job: name each way a checkpoint can be refused (at save, at load), so that callers and tests can
tell them apart; the converters (``convert/``) raise them too, for the same faults met in an HF
directory. Every message says what was found and what to do about it. They stay ``ConvertError``s
(and, for a damaged or mismatched checkpoint, ``CheckpointError``s) of ``nemo_opdlm/errors.py``.
"""

from __future__ import annotations

from nemo_opdlm.errors import CheckpointError, ConvertError


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
