"""Launch an OPDLM run with NeMo-Run (optional; ``slurm/convert_*.sh`` do the same with plain sbatch).

One job: check a recipe with ``opdlm plan`` for the requested cluster, then hand one task,
``python -m nemo_opdlm.cli train --recipe RECIPE key=value ...``, to a NeMo-Run executor: Slurm
(pyxis container, local or SSH tunnel; NeMo-Run starts one task per GPU with srun) or the local
machine (torchrun). Non-goals: the first-run teacher import and the requeue loop of the sbatch
scripts (give the trainer ``init.teacher_hf`` directly; it resumes from ``train.save_dir`` itself).

    python tools/launch.py qwen3_8b_self_tp2_pp1_8g data.path=/data/p.jsonl --account proj --partition gpu \\
        --container-image nvcr.io/nvidia/pytorch:25.04-py3 --container-mounts /data:/data
    python tools/launch.py tiny:tiny_self_tp1_pp1_2g --executor local --gpus-per-node 2 --print-command

NeMo-Run is imported only when a job is really launched (``pip install nemo-run``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEMO_RUN_MISSING = ("tools/launch.py needs NeMo-Run, which is not installed: `pip install nemo-run` "
                    "(or `pip install -e .[launch]`), or submit slurm/convert_8b.sh with sbatch instead")


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
    p.add_argument("--container-image", default=None)
    p.add_argument("--container-mounts", nargs="*", default=[], help="src:dst pairs (the repository is added)")
    p.add_argument("--ssh-host", default=None, help="launch over SSH (default: LocalTunnel on a login node)")
    p.add_argument("--ssh-user", default=None)
    p.add_argument("--job-dir", default=os.path.join(ROOT, "runs", "nemo_run"), help="NeMo-Run's job directory")
    p.add_argument("--python", default="python", help="interpreter on the compute nodes")
    p.add_argument("--skip-plan", action="store_true", help="do not run opdlm plan first")
    p.add_argument("--print-command", action="store_true", help="print the task's command and exit")
    p.add_argument("--dryrun", action="store_true", help="NeMo-Run dry run: show the job script, submit nothing")
    return p.parse_intermixed_args(argv)


def train_command(args: argparse.Namespace) -> str:
    """The per-task shell command (NeMo-Run adds srun / torchrun around it)."""
    cmd = [args.python, "-m", "nemo_opdlm.cli", "train", "--recipe", args.recipe, *args.overrides]
    return f"cd {shlex.quote(ROOT)} && PYTHONPATH={shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}} " + shlex.join(cmd)


def check_plan(args: argparse.Namespace) -> tuple[int, int, int]:
    """Run ``opdlm plan`` for the target cluster; return (nodes, gpus per node, exit code)."""
    from nemo_opdlm.config import ensure_recipes_importable
    from nemo_opdlm.plan import plan_main, recipe_cluster

    ensure_recipes_importable()
    cluster = recipe_cluster(args.recipe)
    nodes = args.nodes or (cluster.nodes if cluster else 1)
    gpn = args.gpus_per_node or (cluster.gpus_per_node if cluster else 8)
    if args.skip_plan:
        return nodes, gpn, 0
    plan_args = [args.recipe, *args.overrides, "--nodes", str(nodes), "--gpus-per-node", str(gpn)]
    if args.gpu:
        plan_args += ["--gpu", args.gpu]
    return nodes, gpn, plan_main(plan_args)


def make_executor(run: Any, args: argparse.Namespace, nodes: int, gpn: int) -> Any:
    if args.executor == "local":
        return run.LocalExecutor(ntasks_per_node=gpn, launcher="torchrun", env_vars={"PYTHONUNBUFFERED": "1"})
    tunnel = (run.SSHTunnel(host=args.ssh_host, user=args.ssh_user, job_dir=args.job_dir) if args.ssh_host
              else run.LocalTunnel(job_dir=args.job_dir))
    kwargs: dict[str, Any] = dict(
        account=args.account, partition=args.partition, nodes=nodes, ntasks_per_node=gpn, gpus_per_node=gpn,
        time=args.time, tunnel=tunnel, env_vars={"PYTHONUNBUFFERED": "1"},
    )
    if args.container_image:
        kwargs.update(container_image=args.container_image,
                      container_mounts=[f"{ROOT}:{ROOT}", *args.container_mounts])
    return run.SlurmExecutor(**{k: v for k, v in kwargs.items() if v is not None})


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.print_command:
        print(train_command(args))
        return 0
    nodes, gpn, rc = check_plan(args)
    if rc != 0:
        print("launch: opdlm plan refused the run (see above); nothing submitted", file=sys.stderr)
        return rc
    try:
        import nemo_run as run
    except ImportError:
        print(f"launch: {NEMO_RUN_MISSING}", file=sys.stderr)
        return 2
    name = args.recipe.replace(":", ".").rpartition(".")[2] or "opdlm"
    task = run.Script(inline=train_command(args))
    with run.Experiment(f"opdlm-{name}") as exp:
        exp.add(task, executor=make_executor(run, args, nodes, gpn), name=name)
        if args.dryrun:
            exp.dryrun()
        else:
            exp.run(detach=args.executor == "slurm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
