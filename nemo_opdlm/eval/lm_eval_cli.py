"""``opdlm lm-eval ARGS...``: lm-evaluation-harness's own command line, with the ``opdlm`` model.

One job: register the adapter (``eval/lm_eval_adapter.py``, after lm-eval's built-in models) and
hand ``ARGS`` to lm-eval's CLI entry, unchanged. lm-eval 0.4.13 discovers no plugin models, so
``lm_eval --model opdlm`` is refused there; this is the entry point that knows it. Every lm-eval
argument works as documented by lm-eval (``run`` is implied, ``ls tasks`` lists tasks). Non-goals:
decoding (the adapter), our own generation-based evaluation (``opdlm eval``).
"""

from __future__ import annotations

import sys
from typing import Sequence

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'nemo-opdlm[eval]'"


USAGE = """usage: opdlm lm-eval [lm-eval's arguments ...]

lm-evaluation-harness's own command line with the `opdlm` model registered beside its built-in ones:
  opdlm lm-eval --model opdlm --model_args hf=STUDENT_DIR,mode=dynamic,threshold=0.9 --tasks gsm8k
(model args: hf= an exported student or HF directory, or ckpt= a trainer step; tokenizer=, and any
opdlm eval decoding setting: mode, block_size, steps_per_block, threshold, temperature, ...).
lm-eval's options follow."""


def lm_eval_main(argv: Sequence[str]) -> int:
    """Run lm-eval's CLI on ``argv`` with the ``opdlm`` model registered; its exit status."""
    asks_help = list(argv) in (["-h"], ["--help"])
    if asks_help:
        print(USAGE, flush=True)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        print(f"opdlm lm-eval: {INSTALL_HINT} ({err})", file=sys.stderr)
        return 0 if asks_help else 2  # the help asked for was given (ours; lm-eval's needs it installed)
    if not asks_help:  # lm-eval's own help needs no model (and the adapter imports megatron-core)
        from nemo_opdlm.eval.lm_eval_adapter import harness_class

        if harness_class() is None:  # pragma: no cover - lm_eval imported above
            print(f"opdlm lm-eval: {INSTALL_HINT}", file=sys.stderr)
            return 2
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv (and inserts 'run' there)
    try:
        cli_evaluate()
    except SystemExit as done:  # argparse's --help and usage errors
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    finally:
        sys.argv = saved
    return 0
