"""tools/launch.py: the task's command (one code location, requeue until finished), the plan gate,
NeMo-Run's import errors, and the Slurm executor and job script built by the real NeMo-Run
(``pip install -e .[launch]``: nemo-run with a leptonai it can import)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = "tiny:tiny_self_tp1_pp1_2g"


@pytest.fixture(scope="module")
def launch():
    spec = importlib.util.spec_from_file_location("opdlm_launch", os.path.join(ROOT, "tools", "launch.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_task_command_runs_the_packaged_code_and_the_plan_gates(launch, capsys):
    assert launch.main([RECIPE, "train.steps=3", "train.save_dir=/shared/r1", "--print-command"]) == 0
    cmd = capsys.readouterr().out.strip()
    # Slurm: the code is NeMo-Run's packaged copy, the task's working directory; no cd to this checkout
    assert cmd.startswith('PYTHONPATH="$PWD""${PYTHONPATH:+:$PYTHONPATH}" python -m nemo_opdlm.cli train '
                          f"--recipe {RECIPE} train.steps=3 train.save_dir=/shared/r1; rc=$?;")
    assert "cd " not in cmd and ROOT not in cmd
    assert "/shared/r1/latest" in cmd and "-lt 3 ]" in cmd
    assert launch.main([RECIPE, "--executor", "local", "--print-command"]) == 0
    assert capsys.readouterr().out.strip() == (
        f'PYTHONPATH={ROOT}"${{PYTHONPATH:+:$PYTHONPATH}}" python -m nemo_opdlm.cli train --recipe {RECIPE}')
    # a recipe the plan refuses is never submitted
    assert launch.main(["qwen3_8b_self_tp2_pp1_8g", "parallel.tp=3"]) == 2
    assert "nothing submitted" in capsys.readouterr().err


@pytest.mark.parametrize("trainer_rc,latest,expected", [
    (0, "step_0000002", 75),   # pre-empted at step 2 of 3: requeue
    (0, None, 75),             # pre-empted before the first checkpoint
    (0, "step_0000003", 0),    # finished: no requeue
    (0, "step_0000010", 0),
    (3, "step_0000001", 3),    # a failure keeps its status (NeMo-Run retries it)
])
def test_requeue_until_finished(launch, tmp_path, trainer_rc, latest, expected):
    if latest:
        (tmp_path / "latest").write_text(latest + "\n")
    facts = launch.RecipeFacts(nodes=1, gpus_per_node=2, steps=3, save_dir=str(tmp_path))
    script = f"(exit {trainer_rc}); {launch.requeue_unless_finished(facts)}"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert out.returncode == expected, out.stdout + out.stderr
    if expected == 75:
        assert f"stopped at step {int(latest[5:]) if latest else 0} of 3" in out.stdout


@pytest.mark.parametrize("missing,says", [
    ("nemo_run", "needs NeMo-Run, which is not installed: `pip install -e .[launch]`"),
    ("leptonai.api.v1", "NeMo-Run is installed but does not import: ModuleNotFoundError: "
                        "No module named 'leptonai.api.v1'; reinstall with `pip install -e .[launch]`"),
])
def test_nemo_run_import_errors_are_reported_as_they_are(launch, monkeypatch, capsys, missing, says):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "nemo_run":
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "nemo_run", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    assert launch.main([RECIPE, "--skip-plan"]) == 2
    assert says in capsys.readouterr().err


# --- with the real NeMo-Run ----------------------------------------------------------------------

def test_slurm_executor_matches_the_sbatch_script(launch):
    run = pytest.importorskip("nemo_run")
    args = launch.parse_args([RECIPE, "--account", "proj", "--container-image", "img:1",
                              "--container-mounts", "/data:/data"])
    facts = launch.RecipeFacts(nodes=2, gpus_per_node=4, steps=3, save_dir="/shared/r1")
    ex = launch.make_executor(run, args, facts)
    assert isinstance(ex, run.SlurmExecutor)
    assert (ex.signal, ex.retries, ex.nodes, ex.ntasks_per_node, ex.gpus_per_node, ex.time) == (
        "USR1@300", 20, 2, 4, 4, "24:00:00")
    assert isinstance(ex.packager, run.GitArchivePackager) and ex.packager.basepath == ROOT
    assert ex.container_mounts == ["/data:/data"]  # the code comes packaged, not mounted from here
    local = launch.make_executor(run, launch.parse_args([RECIPE, "--executor", "local"]), facts)
    assert isinstance(local, run.LocalExecutor) and local.ntasks_per_node == 4


def test_nemo_run_dryrun_writes_the_pre_limit_signal_and_requeue(tmp_path):
    """The command line a user runs (NeMo-Run's tunnel reads stdin: a subprocess, not in-process)."""
    pytest.importorskip("nemo_run")
    argv = [RECIPE, "train.steps=3", "train.save_dir=/shared/r1", "--account", "proj", "--partition", "gpu",
            "--job-dir", str(tmp_path), "--dryrun", "--skip-plan"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "launch.py"), *argv], cwd=tmp_path,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    flat = " ".join(out.split())
    for line in ("#SBATCH --signal=USR1@300", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --partition=gpu", "export TORCHX_MAX_RETRIES=20"):
        assert line in flat, line
    assert "sbatch --requeue" in flat and 'scontrol requeue "$SLURM_JOB_ID"' in flat
    joined = "".join(out.split())  # rich wraps long lines mid-word
    # each task runs in NeMo-Run's packaged copy of the code: srun --chdir <job dir>/<task>/code
    assert f"--chdir{tmp_path}/" in joined and "/code--wait=60" in joined
