"""The speed/accuracy frontier of the tiny conversions at blocks 4, 8 and 16.

One job: for each synthetic task and training seed, take the block-4 OPDLM conversion (the run
``token_efficiency.py`` left in the same ``--work-dir`` when there is one, copied; else trained
here under the same recipe), continue it at block 8 and then at block 16
(``recipes.base.continued_at_block``, ``--stage-steps`` each: the run resumed at the larger
block), and decode each stage's last checkpoint on the held-out split, greedily, with static
decoding (1 token per round) and with thresholds 0.95, 0.9, 0.8 and 0.7. Reported per task,
block and decoding: accuracy, tokens per round and wall-clock tokens/s, mean [min, max] over the
seeds, against the teacher's AR accuracy; and the issue's target, per seed: a block-8 or block-16
student keeping >= 95% of the teacher's accuracy at >= 4 tokens per round under threshold
decoding. The plot draws accuracy against tokens per round, one line per block with its seed
band, the teacher's accuracy across.

Every (task, seed) is its own process with a fixed thread count (``--threads``, recorded), ``--jobs``
at a time; a finished one leaves ``frontier.json`` and is not recomputed::

    python benchmarks/frontier.py --work-dir /tmp/te_ratio     # after token_efficiency.py --grids absolute
    python benchmarks/frontier.py --quick --tasks sort --seeds 0 # a smoke run (CI sizes)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import token_efficiency as TE  # noqa: E402  (the tasks, the teachers and the block-4 runs are its)

BLOCKS = (4, 8, 16)
THRESHOLDS = (0.95, 0.9, 0.8, 0.7)
GRID = "absolute"
"""The shipped default grid (``diffusion.block_grid``), the serving engines'."""
TARGET_FRACTION, TARGET_TOKENS_PER_ROUND = 0.95, 4.0


def decodings() -> list[tuple[str, Optional[float]]]:
    """(mode, threshold): static, then threshold decoding from the strictest threshold down."""
    return [("static", None)] + [("dynamic", t) for t in THRESHOLDS]


def decoding_name(mode: str, threshold: Optional[float]) -> str:
    return "static" if threshold is None else f"t{threshold:g}"


# --- one (task, seed): three stages and their decodings -------------------------------------------


def stage_dir(args: argparse.Namespace, task: str, seed: int) -> str:
    return os.path.join(args.work_dir, task, f"frontier_seed{seed}")


def block4_stage(args: argparse.Namespace, task: str, seed: int, out: str, steps: int) -> None:
    """The block-4 conversion in ``out``: ``token_efficiency.py``'s OPDLM run of this seed copied
    (its last checkpoint, pointer and config) when it reached ``steps``, else trained here."""
    from nemo_opdlm.training.loop import train

    if os.path.isdir(os.path.join(out, f"step_{steps:07d}")):
        return
    source = TE.run_dir(args, task, "opdlm", seed, GRID)
    ckpt = os.path.join(source, f"step_{steps:07d}")
    if os.path.isdir(ckpt) and TE._read_json(os.path.join(source, "curve.json")) is not None:
        os.makedirs(out, exist_ok=True)
        shutil.copytree(ckpt, os.path.join(out, os.path.basename(ckpt)))
        for name in ("latest", "config.yaml"):
            shutil.copy2(os.path.join(source, name), os.path.join(out, name))
        return
    train(conversion(args, task, seed, out, steps))


def conversion(args: argparse.Namespace, task: str, seed: int, out: str, steps: int):
    """The block-4 OPDLM conversion's config (``token_efficiency.py``'s, on the absolute grid)."""
    from nemo_opdlm.recipes import tiny
    from nemo_opdlm.runtime.seeding import demo_train_seed

    teacher = TE._read_json(os.path.join(args.work_dir, task, "teacher.json"))
    cfg = TE._demo_config(args, task)
    data = teacher["data"]
    return tiny.conversion_config(
        teacher_checkpoint=teacher["checkpoint"], data_path=data["train"], tokenizer=data["tokenizer"], save_dir=out,
        method="opdlm", steps=steps, save_every=steps, seed=demo_train_seed(seed),
        prompts_per_step=cfg.prompts_per_step, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        block_grid=GRID)


def one_seed(args: argparse.Namespace, task: str, seed: int) -> int:
    """Train the three stages (this process) and decode each; write ``frontier.json``."""
    import torch

    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.eval.evaluate import DecodeSettings, evaluate
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.recipes.base import continued_at_block
    from nemo_opdlm.recipes.tiny import MASK_ID, MAX_NEW_TOKENS
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from nemo_opdlm.training.loop import train

    torch.set_num_threads(args.threads)
    out = stage_dir(args, task, seed)
    steps = args.stage_steps
    t0 = time.perf_counter()
    block4_stage(args, task, seed, out, steps)
    cfg = conversion(args, task, seed, out, steps)
    stages = {4: steps}
    for block in BLOCKS[1:]:
        cfg = continued_at_block(cfg, name=f"frontier_b{block}", block_size=block, steps=cfg.train.steps + steps)
        train(cfg)
        stages[block] = cfg.train.steps
    train_s = time.perf_counter() - t0
    teacher = TE._read_json(os.path.join(args.work_dir, task, "teacher.json"))
    demo_cfg = TE._demo_config(args, task)
    task_obj = T.load_task(teacher["data"]["eval_format"], teacher["data"]["test"])
    points = []
    with runtime(ParallelLayout(), seed=1234) as rt:
        for block, step in stages.items():
            model = load_model(rt.ctx, ckpt=os.path.join(out, f"step_{step:07d}"), tokenizer=teacher["data"]["tokenizer"],
                               mask_token_id=MASK_ID)
            assert model.diffusion.block_size == block, (block, model.diffusion)
            for mode, threshold in decodings():
                settings = DecodeSettings(mode=mode, max_new_tokens=MAX_NEW_TOKENS, chat_template="never",
                                          batch_size=min(64, demo_cfg.num_test), seed=demo_cfg.seed,
                                          **({} if threshold is None else {"threshold": threshold}))
                res = evaluate(model.chunks, model.tokenizer, task_obj, settings, diffusion=model.diffusion)
                points.append({"block": block, "step": step, "decoding": decoding_name(mode, threshold),
                               "accuracy": res.accuracy, "tokens_per_round": res.tokens_per_round,
                               "tokens_per_s": res.tokens_generated / max(res.wall_time_s, 1e-9)})
    TE._write_json(os.path.join(out, "frontier.json"), {
        "task": task, "seed": seed, "stages": stages, "points": points, "threads": args.threads,
        "train_s": train_s, "eval_s": time.perf_counter() - t0 - train_s})
    return 0


# --- summary ------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], teacher_accuracy: float) -> dict[str, Any]:
    """Per block and decoding: mean [min, max] over seeds of accuracy, tokens per round and
    tokens/s; and per seed the best threshold decoding at block 8 or 16 that keeps >= 95% of the
    teacher at >= 4 tokens per round (the target), or the best trade-off reached."""
    table = []
    for block in BLOCKS:
        for mode, threshold in decodings():
            name = decoding_name(mode, threshold)
            cells = [p for r in runs for p in r["points"] if p["block"] == block and p["decoding"] == name]
            if not cells:
                continue
            row: dict[str, Any] = {"block": block, "decoding": name}
            for key in ("accuracy", "tokens_per_round", "tokens_per_s"):
                values = [c[key] for c in cells]
                row[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
            table.append(row)
    per_seed = []
    for r in runs:
        larger = [p for p in r["points"] if p["block"] > 4 and p["decoding"] != "static"]
        meets = [p for p in larger if p["accuracy"] >= TARGET_FRACTION * teacher_accuracy
                 and p["tokens_per_round"] >= TARGET_TOKENS_PER_ROUND]
        best = max(meets or larger, key=lambda p: (p["tokens_per_round"] if meets else
                                                   p["accuracy"] / max(teacher_accuracy, 1e-9) * p["tokens_per_round"]))
        per_seed.append({"seed": r["seed"], "met": bool(meets), "block": best["block"], "decoding": best["decoding"],
                         "accuracy_fraction": best["accuracy"] / max(teacher_accuracy, 1e-9),
                         "tokens_per_round": best["tokens_per_round"]})
    return {"table": table, "target": {"per_seed": per_seed, "met_in_every_seed": all(s["met"] for s in per_seed)}}


def print_summary(result: dict[str, Any]) -> None:
    for task, t in result["tasks"].items():
        print(f"\n== {task}: teacher AR accuracy {t['teacher_accuracy']:.3f}; seeds {result['setup']['seeds']}")
        print(f"{'block':>5} {'decoding':<8} {'accuracy mean [min,max]':<26} {'tok/round':>9} {'tokens/s':>9}")
        for row in t["summary"]["table"]:
            a = row["accuracy"]
            print(f"{row['block']:>5} {row['decoding']:<8} {a['mean']:.3f} [{a['min']:.2f}, {a['max']:.2f}]"
                  f"{'':<9} {row['tokens_per_round']['mean']:>9.2f} {row['tokens_per_s']['mean']:>9.0f}")
        target = t["summary"]["target"]
        print(f"target (block 8/16, >= {TARGET_FRACTION:.0%} of the teacher at >= {TARGET_TOKENS_PER_ROUND:g} tok/round, "
              f"threshold): {'met in every seed' if target['met_in_every_seed'] else 'not met in every seed'}; "
              + "; ".join(f"seed {s['seed']}: block {s['block']} {s['decoding']} {s['accuracy_fraction']:.0%} at "
                          f"{s['tokens_per_round']:.2f}" for s in target["per_seed"]))


def plot(result: dict[str, Any], png: str) -> Optional[str]:
    """Accuracy against tokens per round per task, one line per block (seed means) with the min/max
    accuracy band, the teacher's AR accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, (task, t) in zip(axes[0], tasks.items()):
        for block in BLOCKS:
            rows = sorted((r for r in t["summary"]["table"] if r["block"] == block),
                          key=lambda r: r["tokens_per_round"]["mean"])
            if not rows:
                continue
            x = [r["tokens_per_round"]["mean"] for r in rows]
            line, = ax.plot(x, [r["accuracy"]["mean"] for r in rows], marker="o", label=f"block {block}")
            ax.fill_between(x, [r["accuracy"]["min"] for r in rows], [r["accuracy"]["max"] for r in rows],
                            color=line.get_color(), alpha=0.2)
        ax.axhline(t["teacher_accuracy"], color="k", linestyle="--", label="teacher (AR)")
        ax.set_title(task)
        ax.set_xlabel("tokens per round (static, then thresholds 0.95 -> 0.7)")
        ax.set_ylabel("held-out accuracy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return os.path.relpath(png, ROOT)  # the result file names it from the repository, on any machine


# --- driver -------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/opdlm_token_efficiency",
                   help="token_efficiency.py's work directory (its teachers and block-4 runs are reused)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--tasks", nargs="+", default=list(TE.TASKS), choices=TE.TASKS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--stage-steps", type=int, default=300, help="steps of each stage (block 4, 8, 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (fixed, recorded)")
    p.add_argument("--jobs", type=int, default=2, help="(task, seed) processes at a time")
    p.add_argument("--teacher-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-test", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="a smoke run: the demo's CI sizes, 4 steps per stage")
    p.add_argument("--one", nargs=2, metavar=("TASK", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.grids = [GRID]  # what token_efficiency's helpers read
    if args.quick:
        args.stage_steps = 4
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.one:
        return one_seed(args, args.one[0], int(args.one[1]))
    from nemo_opdlm import demo as D

    log = D.Progress()
    t0 = time.perf_counter()
    teachers = {task: TE.prepare_task(args, task, log) for task in args.tasks}
    todo = [(t, s) for t in args.tasks for s in args.seeds
            if TE._read_json(os.path.join(stage_dir(args, t, s), "frontier.json")) is None]
    running: list[tuple[tuple[str, int], subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            task, seed = todo.pop(0)
            os.makedirs(os.path.join(args.work_dir, task), exist_ok=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--one", task, str(seed), "--work-dir", args.work_dir,
                   "--stage-steps", str(args.stage_steps), "--threads", str(args.threads)]
            cmd += ["--quick"] if args.quick else []
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
            logf = open(stage_dir(args, task, seed) + ".log", "w")
            running.append(((task, seed), subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for item in list(running):
            (task, seed), proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode:
                raise SystemExit(f"frontier: {task} seed {seed} failed; see {stage_dir(args, task, seed)}.log")
            log(f"  {task} seed {seed}: done")
    result: dict[str, Any] = {
        "command": "python benchmarks/frontier.py " + " ".join(argv), "commit": TE.commit(),
        "setup": {"seeds": args.seeds, "blocks": list(BLOCKS), "thresholds": list(THRESHOLDS), "grid": GRID,
                  "stage_steps": args.stage_steps, "threads_per_process": args.threads, "parallel": args.jobs,
                  "recipe": "tiny.conversion_config, then recipes.base.continued_at_block"},
        "tasks": {}, "wall_s": None,
    }
    for task in args.tasks:
        runs = [TE._read_json(os.path.join(stage_dir(args, task, s), "frontier.json")) for s in args.seeds]
        accuracy = teachers[task]["ar"]["accuracy"]
        result["tasks"][task] = {"teacher_accuracy": accuracy, "runs": runs, "summary": summarize(runs, accuracy)}
    result["wall_s"] = time.perf_counter() - t0
    os.makedirs(args.results, exist_ok=True)
    name = "frontier_quick" if args.quick else "frontier"
    result["plot"] = plot(result, os.path.join(args.results, f"{name}.png"))
    TE._write_json(os.path.join(args.results, f"{name}.json"), result)
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
