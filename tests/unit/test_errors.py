"""One exception hierarchy, and the command line printing any project error as one line."""

from __future__ import annotations

import json

from nemo_opdlm import cli, errors
from nemo_opdlm.checkpoint import errors as checkpoint_errors
from nemo_opdlm.convert import errors as convert_errors


def test_hierarchy():
    for cls in (errors.ConfigError, errors.DataError, errors.CheckpointError, errors.ConvertError,
                errors.NonFiniteLossError, convert_errors.UnsupportedArchitectureError,
                checkpoint_errors.CheckpointFileError):
        assert issubclass(cls, errors.OPDLMError), cls
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.DataError, ValueError)
    assert issubclass(checkpoint_errors.CheckpointFileError, errors.CheckpointError)  # one "damaged checkpoint"
    assert not issubclass(errors.ConvertError, errors.ConfigError)
    from nemo_opdlm.config import ConfigError
    from nemo_opdlm.data.prompts import DataError
    from nemo_opdlm.training.loop import NonFiniteLossError
    assert (ConfigError, DataError, NonFiniteLossError) == (errors.ConfigError, errors.DataError,
                                                           errors.NonFiniteLossError)


def test_cli_prints_a_data_error_as_one_line(tmp_path, capsys):
    """A prompt file without the prompt field: rc 2 and one line naming the file and the field, no
    traceback (before, a DataError reached the user as a traceback)."""
    from tests.train_fixtures import make_run
    from nemo_opdlm.config import dump_yaml

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "hi"}) + "\n")
    recipe = tmp_path / "run.yaml"
    recipe.write_text(dump_yaml(make_run(str(tmp_path), f"data.path={bad}", "train.save_dir=null")))
    capsys.readouterr()  # the fixture's own output (writing the tiny HF teacher)
    assert cli.main(["train", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error (DataError)" in err[0] and "bad.jsonl" in err[0] and "'prompt'" in err[0], err
    assert cli.main(["train", "--recipe", str(recipe), "train.stepz=1"]) == 2
    assert "config error: unknown config key 'train.stepz'" in capsys.readouterr().err


def test_cli_unknown_command_version_and_module_entry(capsys):
    """An unknown command is named (with the closest one) before the usage, exit 2; --version prints
    the installed version; ``python -m nemo_opdlm`` is the same command line."""
    import subprocess
    import sys

    from nemo_opdlm.cli import main

    assert main(["trian"]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == "opdlm: unknown command 'trian'; did you mean 'train'?"
    assert captured.out.startswith("usage: opdlm")
    assert main(["--help"]) == 0 and "unknown command" not in capsys.readouterr().err
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("nemo-opdlm ")
    out = subprocess.run([sys.executable, "-m", "nemo_opdlm", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("nemo-opdlm "), out.stderr


def test_every_command_answers_help_without_running_or_importing_torch():
    """``opdlm X --help`` prints X's usage, runs nothing and imports neither torch nor megatron-core
    (5 to 17 s before; ``eval --help`` 2.3 s until data reading stopped importing torch: 0.14 s;
    ``lm-eval``'s options are lm-eval's, printed by lm-eval after ours). ``opdlm smoke --help`` names the unknown command instead of running anything."""
    import subprocess
    import sys

    from nemo_opdlm.cli import COMMANDS

    probe = ("import sys, io, contextlib; from nemo_opdlm.cli import main; out = io.StringIO()\n"
             "with contextlib.redirect_stdout(out):\n"
             "    try:\n        rc = main(sys.argv[1:])\n    except SystemExit as e:\n        rc = e.code\n"
             "print(rc, 'torch' in sys.modules, 'megatron' in sys.modules, out.getvalue().split(chr(10))[0])")
    for name in COMMANDS:
        res = subprocess.run([sys.executable, "-c", probe, name, "--help"], capture_output=True, text=True, timeout=120)
        rc, torch, megatron, first = res.stdout.strip().split(" ", 3)
        assert (rc, megatron) == ("0", "False") and first.startswith(f"usage: opdlm {name}"), (name, res.stdout)
        assert torch == "False", (name, torch)
    res = subprocess.run([sys.executable, "-c", probe, "smoke", "--help"], capture_output=True, text=True, timeout=120)
    assert res.stdout.split()[:3] == ["2", "False", "False"]
    assert res.stderr.startswith("opdlm: unknown command 'smoke'")


def test_eval_train_and_plan_options_all_have_help(capsys, monkeypatch):
    """Every option of ``opdlm eval`` (--tp, --pp, --threshold, --temperature and --seed had none),
    ``opdlm train`` and ``opdlm plan`` says what it does in ``--help``."""
    import argparse

    from nemo_opdlm import cli
    from nemo_opdlm.plan import cli as plan_cli
    from nemo_opdlm.eval import cli as eval_cli

    parsers: dict[str, argparse.ArgumentParser] = {}
    real = argparse.ArgumentParser.parse_known_args

    def keep(self, *args, **kwargs):
        parsers[self.prog] = self
        return real(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", keep)
    for run in (lambda: eval_cli.parse_args(["--help"]), lambda: plan_cli.parse_args(["--help"]),
                lambda: cli.main(["train", "--help"])):
        try:
            run()
        except SystemExit:
            pass
    capsys.readouterr()
    assert set(parsers) == {"opdlm eval", "opdlm plan", "opdlm train"}, set(parsers)
    for prog, parser in parsers.items():
        missing = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert not missing, (prog, missing)
    assert "tensor-parallel size" in parsers["opdlm eval"].format_help()
