"""The package's exceptions: one hierarchy, at the bottom of the import graph (imports nothing).

One job: name the kinds of problem a user can fix, so that the command line can print any of them as
one line (``cli.py`` catches :class:`OPDLMError`) and callers and tests can tell them apart. Every
message names the field or file at fault and the remedy. Anything else that escapes is a bug and
keeps its traceback.

- :class:`ConfigError`: a config value (a recipe, a YAML file, a ``key=value`` override, an argument).
- :class:`DataError`: a dataset (file, record, field).
- :class:`CheckpointError`: a checkpoint or weights file that is missing, damaged or of another model.
- :class:`ConvertError`: a Hugging Face <-> megatron-core conversion that cannot proceed
  (``convert/errors.py`` refines it).
- :class:`NonFiniteLossError`: training diverged (too many non-finite steps in a row);
  :class:`NonFiniteStateError`: the student's weights or optimizer state are not finite (nothing saved).

Each also derives from the builtin a caller would have caught before (``ValueError`` for bad values,
``RuntimeError`` for runs), so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class OPDLMError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(OPDLMError, ValueError):
    """An invalid or inconsistent config value; the message names the key."""


class DataError(OPDLMError, ValueError):
    """A dataset cannot be used as configured; the message names the file / field and the fix."""


class CheckpointError(OPDLMError, RuntimeError):
    """A checkpoint (or a weights file) is missing, incomplete, damaged or of another model."""


class ConvertError(OPDLMError, ValueError):
    """A conversion cannot proceed; nothing has been written to the target."""


class NonFiniteLossError(OPDLMError, RuntimeError):
    """Too many consecutive steps had a non-finite loss, teacher target or gradient norm."""


class NonFiniteStateError(NonFiniteLossError):
    """The student's weights or optimizer state are not finite; no checkpoint of them was written."""
