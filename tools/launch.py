"""Launch an OPDLM run with NeMo-Run (optional; ``slurm/convert_*.sh`` do the same with plain sbatch).

One job: check a recipe with ``opdlm plan`` for the requested cluster, then hand one task,
``python -m nemo_opdlm.cli train --recipe RECIPE key=value ...``, to a NeMo-Run executor: Slurm
(pyxis container, local or SSH tunnel; NeMo-Run starts one task per GPU with srun) or the local
machine (torchrun). On Slurm the job behaves as ``slurm/convert_8b.sh`` does: a pre-emption signal
300 s before the time limit (the trainer checkpoints and exits), and a requeue until training is
finished. Non-goals: the first-run teacher import of the sbatch scripts (give the trainer
``init.teacher_hf`` directly; it resumes from ``train.save_dir`` itself).

    python tools/launch.py qwen3_8b_self_tp2_pp1_8g data.path=/data/p.jsonl train.save_dir=/lustre/run1 \\
        --account proj --partition gpu --container-image nvcr.io/nvidia/pytorch:25.04-py3 \\
        --container-mounts /data:/data /lustre:/lustre
    python tools/launch.py tiny:tiny_self_tp1_pp1_2g --executor local --gpus-per-node 2 --print-command

The code the tasks run is the copy NeMo-Run packages (``git archive`` of HEAD for Slurm, the
checkout itself for the local executor): the task's command imports ``nemo_opdlm`` from its working
directory and never changes to this checkout's host path. NeMo-Run is imported only when a job is
really launched (``pip install -e .[launch]``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NEMO_RUN_INSTALL = ("`pip install -e .[launch]` (nemo-run 0.11 with leptonai 0.27.3: leptonai 0.47 dropped "
                    "leptonai.api.v1, which nemo-run 0.11 imports), or submit slurm/convert_8b.sh with sbatch")

PRE_LIMIT_SIGNAL = "USR1@300"
"""slurm/convert_8b.sh's ``B:USR1@300`` without ``B:``: that script's batch shell traps USR1 and
forwards it to the training step, but NeMo-Run's batch script has no trap (USR1 would kill it), so
Slurm signals the job step's tasks themselves; each trainer rank checkpoints and exits 0."""
MAX_RESTARTS = 20
"""Requeues before giving up (slurm/opdlm_job.sh's MAX_RESTARTS default)."""
REQUEUE_EXIT = 75
"""Exit status of a task whose training stopped (pre-empted) before ``train.steps``: non-zero, so
NeMo-Run's batch script runs ``scontrol requeue`` while restarts are left."""


class LaunchError(RuntimeError):
    """Why nothing was submitted: one line for the user."""


@dataclass(frozen=True)
class RecipeFacts:
    """What the launcher needs from a resolved recipe."""

    nodes: int
    gpus_per_node: int
    steps: int
    save_dir: str


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe (module:function or bare name) or YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides passed to opdlm train")
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    p.add_argument("--nodes", type=int, default=None, help="default: the recipe's cluster")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: the recipe's cluster")
    p.add_argument("--gpu", default=None, help="GPU kind for the memory plan (default: the recipe's)")
    p.add_argument("--account", default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                   help="Slurm requeues after a pre-emption or the time limit (NeMo-Run's retries)")
    p.add_argument("--container-image", default=None)
    p.add_argument("--container-mounts", nargs="*", default=[],
                   help="src:dst pairs: data, checkpoints, train.save_dir (the code is NeMo-Run's packaged copy)")
    p.add_argument("--ssh-host", default=None, help="launch over SSH (default: LocalTunnel on a login node)")
    p.add_argument("--ssh-user", default=None)
    p.add_argument("--job-dir", default=os.path.join(ROOT, "runs", "nemo_run"), help="NeMo-Run's job directory")
    p.add_argument("--python", default="python", help="interpreter on the compute nodes")
    p.add_argument("--skip-plan", action="store_true", help="do not run opdlm plan first")
    p.add_argument("--print-command", action="store_true", help="print the task's command and exit")
    p.add_argument("--dryrun", action="store_true", help="NeMo-Run dry run: show the job script, submit nothing")
    args = p.parse_intermixed_args(argv)
    args.job_dir = os.path.abspath(args.job_dir)
    return args


# --- the recipe (the one place this tool imports the recipes) -----------------------------------

def recipe_facts(args: argparse.Namespace) -> RecipeFacts:
    """Resolve the recipe with its overrides: the cluster it asks for, ``train.steps``, ``train.save_dir``."""
    from nemo_opdlm.recipes.lookup import resolve
    from nemo_opdlm.plan.cli import recipe_cluster

    cluster = recipe_cluster(args.recipe)
    cfg = resolve(args.recipe, list(args.overrides))
    return RecipeFacts(nodes=args.nodes or (cluster.nodes if cluster else 1),
                       gpus_per_node=args.gpus_per_node or (cluster.gpus_per_node if cluster else 8),
                       steps=cfg.train.steps, save_dir=cfg.train.save_dir)


def check_plan(args: argparse.Namespace, facts: RecipeFacts) -> int:
    """``opdlm plan`` for the target cluster; its exit code (0: the run fits)."""
    from nemo_opdlm.plan.cli import plan_main

    plan_args = [args.recipe, *args.overrides, "--nodes", str(facts.nodes), "--gpus-per-node", str(facts.gpus_per_node)]
    if args.gpu:
        plan_args += ["--gpu", args.gpu]
    return plan_main(plan_args)


# --- the task --------------------------------------------------------------------------------------

def code_dir(args: argparse.Namespace) -> str:
    """Where the task imports ``nemo_opdlm`` from (shell): on Slurm, NeMo-Run's packaged copy, the
    task's working directory (srun ``--chdir`` / ``--container-workdir``); locally, this checkout."""
    return '"$PWD"' if args.executor == "slurm" else shlex.quote(ROOT)


def train_command(args: argparse.Namespace) -> str:
    """The per-task shell command (NeMo-Run adds srun / torchrun around it)."""
    cmd = [args.python, "-m", "nemo_opdlm.cli", "train", "--recipe", args.recipe, *args.overrides]
    return f'PYTHONPATH={code_dir(args)}"${{PYTHONPATH:+:$PYTHONPATH}}" ' + shlex.join(cmd)


def requeue_unless_finished(facts: RecipeFacts) -> str:
    """Shell that follows the trainer on Slurm: a clean exit before ``train.steps`` (a pre-emption or
    the pre-limit signal) becomes :data:`REQUEUE_EXIT`, as slurm/opdlm_job.sh requeues only then."""
    latest = shlex.quote(os.path.join(facts.save_dir, "latest"))
    return (f'rc=$?; if [ "$rc" -eq 0 ]; then '
            f"done=$(sed -n 's/^step_0*\\([0-9][0-9]*\\).*/\\1/p' {latest} 2>/dev/null); "
            f'if [ "${{done:-0}}" -lt {facts.steps} ]; then '
            f'echo "opdlm: stopped at step ${{done:-0}} of {facts.steps}: exit {REQUEUE_EXIT} to requeue"; '
            f"exit {REQUEUE_EXIT}; fi; fi; exit $rc")


def task_script(args: argparse.Namespace, facts: RecipeFacts) -> str:
    if args.executor == "local":
        return train_command(args)
    return f"{train_command(args)}; {requeue_unless_finished(facts)}"


# --- NeMo-Run --------------------------------------------------------------------------------------

def import_nemo_run() -> Any:
    """``nemo_run``, or a LaunchError saying why not: not installed, or installed but failing to import
    (with the real error: a dependency of the wrong version is the usual cause)."""
    try:
        import nemo_run
    except ImportError as err:
        if err.name == "nemo_run":
            raise LaunchError(f"tools/launch.py needs NeMo-Run, which is not installed: {NEMO_RUN_INSTALL}") from err
        raise LaunchError(f"NeMo-Run is installed but does not import: {type(err).__name__}: {err}; "
                          f"reinstall with {NEMO_RUN_INSTALL}") from err
    return nemo_run


def make_executor(run: Any, args: argparse.Namespace, facts: RecipeFacts) -> Any:
    env = {"PYTHONUNBUFFERED": "1"}
    if args.executor == "local":
        # no packaging: the task imports this checkout (train_command's PYTHONPATH)
        return run.LocalExecutor(ntasks_per_node=facts.gpus_per_node, launcher="torchrun", env_vars=env)
    tunnel = (run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.job_dir) if args.ssh_host
              else run.LocalTunnel(job_dir=args.job_dir))
    kwargs: dict[str, Any] = dict(
        account=args.account, partition=args.partition, nodes=facts.nodes, ntasks_per_node=facts.gpus_per_node,
        gpus_per_node=facts.gpus_per_node, time=args.time, tunnel=tunnel, env_vars=env,
        signal=PRE_LIMIT_SIGNAL, retries=args.max_restarts,  # NeMo-Run submits with sbatch --requeue
        packager=run.GitArchivePackager(basepath=ROOT),
    )
    if args.container_image:
        kwargs.update(container_image=args.container_image, container_mounts=list(args.container_mounts))
    return run.SlurmExecutor(**{k: v for k, v in kwargs.items() if v is not None})


def experiment_name(args: argparse.Namespace) -> str:
    return args.recipe.replace(":", ".").rpartition(".")[2] or "opdlm"


def add_task(run: Any, exp: Any, args: argparse.Namespace, facts: RecipeFacts) -> None:
    """Add the training task to ``exp`` (inside its ``with`` block, as NeMo-Run requires)."""
    exp.add(run.Script(inline=task_script(args, facts)), executor=make_executor(run, args, facts),
            name=experiment_name(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from nemo_opdlm.errors import OPDLMError

    try:
        facts = recipe_facts(args)
    except OPDLMError as err:
        print(f"launch: {err}; nothing submitted", file=sys.stderr)
        return 2
    if args.print_command:
        print(task_script(args, facts))
        return 0
    if not args.skip_plan and (rc := check_plan(args, facts)) != 0:
        print("launch: opdlm plan refused the run (see above); nothing submitted", file=sys.stderr)
        return rc
    try:
        run = import_nemo_run()
    except LaunchError as err:
        print(f"launch: {err}", file=sys.stderr)
        return 2
    if args.executor == "slurm" and not os.path.isabs(facts.save_dir):
        print(f"launch: train.save_dir={facts.save_dir} is relative: checkpoints go inside this job's NeMo-Run "
              "directory (a requeue resumes, a new launch starts over); give an absolute path on shared "
              "storage to resume across launches", file=sys.stderr)
    # NeMo-Run's Slurm executor finds the repository to package from the working directory
    with contextlib.chdir(ROOT), run.Experiment(f"opdlm-{experiment_name(args)}", base_dir=args.job_dir) as exp:
        add_task(run, exp, args, facts)
        if args.dryrun:
            exp.dryrun()
        else:
            exp.run(detach=args.executor == "slurm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
