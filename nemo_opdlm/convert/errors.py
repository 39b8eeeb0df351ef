"""Errors raised by the Hugging Face <-> Megatron converters.

One job: name each way a conversion can be refused, so that callers (and tests) can tell them
apart. Every message says what was found and what to do about it. The faults a converter shares
with every reader and writer of checkpoints (damaged files, an occupied target, another model's
weights or vocabulary) are ``checkpoint/errors.py``'s.
"""

from __future__ import annotations

from nemo_opdlm.errors import ConvertError  # noqa: F401  (re-exported)


class UnsupportedArchitectureError(ConvertError):
    """The HF config names an architecture (or an architecture feature) this converter lacks."""


class ServingLayoutError(ConvertError):
    """The student does not fit the layout the serving engines load (``--format sdar``): the wrong
    family, [MASK] id, logit alignment or block grid."""
