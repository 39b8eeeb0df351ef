"""The library warnings every run on a machine without Transformer Engine or apex prints, filtered.

One job: hide, in this process, the known warnings that say nothing to act on (megatron-core's
"Transformer Engine and Apex are not installed" family, one per module that imports them, and a few
deprecation notices about megatron-core's own internals), and hand the same filter to child processes.
Setting ``PYTHONWARNINGS`` inside a process only reaches its children, which is why these used to
reach the user's terminal; any other warning still shows. A user who sets ``PYTHONWARNINGS``
(or ``-W``) chooses for themselves: nothing is filtered then.
"""

from __future__ import annotations

import os
import warnings

KNOWN: tuple[tuple[str, type[Warning]], ...] = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("full scope is deprecated", UserWarning),  # megatron-core's own default cuda_graph_scope
    ("Warning: tp_group is None", DeprecationWarning),
    ("MLP requires ffn_hidden_size", DeprecationWarning),
    ("The 'megatron.core.transformer.custom_layers.transformer_engine'", DeprecationWarning),
    ("The following imports from `dynamic_context.py`", DeprecationWarning),
    ("`load_state_dict` is deprecated and will be removed", FutureWarning),  # megatron's dist-checkpoint load
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)
"""(start of the message, category) of each known warning; matched as a prefix, as ``-W`` does."""


def user_chose() -> bool:
    """The user set warning filters themselves (``PYTHONWARNINGS`` or ``-W``)."""
    import sys

    return bool(os.environ.get("PYTHONWARNINGS")) or bool(sys.warnoptions)


def filter_known_warnings() -> None:
    """Ignore the KNOWN warnings in this process (idempotent) and in the processes it starts, unless
    the user set their own filters."""
    if user_chose():
        return
    for message, category in KNOWN:
        warnings.filterwarnings("ignore", message=_escape(message), category=category)
    # children read the same filters from the environment at start-up (and then leave them as they are)
    os.environ["PYTHONWARNINGS"] = ",".join(f"ignore:{m}:{c.__name__}" for m, c in KNOWN if ":" not in m)


def _escape(text: str) -> str:
    import re

    return re.escape(text)
