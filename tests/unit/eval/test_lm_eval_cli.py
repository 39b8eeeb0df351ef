"""``opdlm lm-eval`` without lm-evaluation-harness installed (a ``.[test]``-only install): ``--help``
gives our usage and the install hint and exits 0; a run says how to install it and exits 2."""

from __future__ import annotations

import sys

import pytest

from nemo_opdlm.eval.lm_eval_cli import INSTALL_HINT, USAGE, lm_eval_main


@pytest.fixture
def without_lm_eval(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_with_our_usage_and_the_install_hint(without_lm_eval, capsys, flag):
    assert lm_eval_main([flag]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(USAGE.split("\n")[0]) and INSTALL_HINT in err


def test_a_run_is_refused_with_the_install_hint(without_lm_eval, capsys):
    assert lm_eval_main(["--model", "opdlm", "--tasks", "gsm8k"]) == 2
    assert INSTALL_HINT in capsys.readouterr().err
