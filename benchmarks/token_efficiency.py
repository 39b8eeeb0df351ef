"""Token efficiency of AR-to-diffusion conversion methods, from one teacher, on the synthetic task.

One job: pre-train one AR teacher on the arithmetic task (as ``opdlm demo`` does), then convert it
into a block-diffusion student (block 4) with each method, for the same number of steps with a
constant learning rate, saving a checkpoint every ``--eval-every`` steps (each one a token budget):

- ``opdlm``: the student's own rollouts, masks from its decoding trajectory, forward KL;
- ``random_mask``: own rollouts, random masks, forward KL ("OPDLM off" in the paper);
- ``off_policy``: the teacher's own (causal, T=1) responses, random masks, forward KL;
- ``sft``: the training file's responses, random masks, masked-diffusion cross-entropy (the
  standard AR-to-diffusion conversion).

Every checkpoint is scored on the held-out split with greedy static (1 token per round) and dynamic
(threshold 0.9) decoding. Training tokens are response tokens trained on (rollout tokens; the
dataset's response tokens for sft). Reported: accuracy against tokens per method and mode, and
the tokens each method needs to reach 95% of the teacher's accuracy (linear interpolation between
checkpoints; None if it never does within the budget) with its ratio to OPDLM's.

Writes ``benchmarks/results/token_efficiency.json`` and ``.png``. Run (about half an hour on 2
shared cores)::

    OMP_NUM_THREADS=1 python benchmarks/token_efficiency.py [--steps 400 --eval-every 50] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("opdlm", "random_mask", "off_policy", "sft")
MODES = ("static", "dynamic")
TARGET = 0.95
FRACTIONS = (0.5, 0.8, 0.95)
"""Fractions of the teacher's accuracy at which tokens-to-reach are also reported (small budgets
may leave 95% unreached by every method)."""


def tokens_to_reach(curve: list[tuple[float, float]], target: float) -> Optional[float]:
    """First training-token count at which the (piecewise linear) accuracy curve reaches ``target``."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if y0 >= target:
            return x0
        if y1 >= target:
            return x0 + (target - y0) / (y1 - y0) * (x1 - x0)
    if curve and curve[-1][1] >= target:
        return curve[-1][0]
    return None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Tokens to reach each fraction of the teacher's accuracy, and the ratio to OPDLM's, per method/mode."""
    teacher = result["teacher"]["ar"]["accuracy"]
    out: dict[str, Any] = {}
    for frac in FRACTIONS:
        reach = {m: {mode: tokens_to_reach([(p["tokens"], p["accuracy"]) for p in c[mode]], frac * teacher)
                     for mode in MODES} for m, c in result["curves"].items()}
        ratio = {m: {mode: (reach[m][mode] / reach["opdlm"][mode]
                            if "opdlm" in reach and reach[m][mode] and reach["opdlm"][mode] else None)
                     for mode in MODES} for m in reach}
        out[f"{round(100 * frac)}pct"] = {"target_accuracy": frac * teacher, "tokens": reach, "ratio_to_opdlm": ratio}
    return out


def print_summary(result: dict[str, Any]) -> None:
    teacher = result["teacher"]["ar"]["accuracy"]
    print(f"\nteacher AR accuracy {teacher:.3f}; tokens to reach a fraction of it (x OPDLM's), '-' = not reached")
    fracs = list(result["reach"])
    print(f"{'method':<12} {'mode':<8} {'final acc':>9} " + " ".join(f"{f:>20}" for f in fracs))
    for m, c in result["curves"].items():
        for mode in MODES:
            cells = []
            for f in fracs:
                r, q = result["reach"][f]["tokens"][m][mode], result["reach"][f]["ratio_to_opdlm"][m][mode]
                cells.append("-" if r is None else f"{r:.0f}" + ("" if q is None else f" ({q:.2f}x)"))
            print(f"{m:<12} {mode:<8} {c[mode][-1]['accuracy']:>9.3f} " + " ".join(f"{x:>20}" for x in cells))


def plot(result: dict[str, Any], png: str) -> str:
    from nemo_opdlm.eval.plot import Panel, Series, save_line_plot

    teacher = result["teacher"]["ar"]["accuracy"]
    panels = [Panel(f"{mode} decoding" + (" (1 token/round)" if mode == "static" else " (thr 0.9)"),
                    "training tokens", "held-out accuracy",
                    [Series(m, [p["tokens"] for p in c[mode]], [p["accuracy"] for p in c[mode]])
                     for m, c in result["curves"].items()],
                    hlines=[("teacher (AR)", teacher), ("95% of teacher", TARGET * teacher)]) for mode in MODES]
    return save_line_plot(png, panels, title="AR -> block diffusion (block 4): accuracy vs conversion tokens")


def resummarize(path: str, argv: list[str]) -> int:
    """Recompute the summary and the plot of an existing result file (no training)."""
    with open(path) as f:
        result = json.load(f)
    result["reach"] = summarize(result)
    result["summarized_by"] = "python benchmarks/token_efficiency.py " + " ".join(argv)
    png = os.path.join(ROOT, result["plot"])
    result["plot_backend"] = plot(result, png)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print_summary(result)
    return 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/opdlm_token_efficiency", help="checkpoints (not committed)")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--steps", type=int, default=400, help="conversion steps per method")
    p.add_argument("--eval-every", type=int, default=50, help="checkpoint (= token budget) spacing in steps")
    p.add_argument("--teacher-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3, help="constant conversion learning rate (after warm-up)")
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a minute-long smoke run (tiny model, few steps)")
    p.add_argument("--resummarize", metavar="JSON", help="only recompute the summary and plot of a result file")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize, list(argv if argv is not None else sys.argv[1:]))
    from nemo_opdlm import demo as D
    from nemo_opdlm.eval import synthetic as S
    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from nemo_opdlm.training.loop import train

    fields: dict[str, Any] = dict(D.QUICK) if args.quick else {}
    fields.update(num_test=fields.get("num_test", args.num_test),
                  teacher_steps=fields.get("teacher_steps", args.teacher_steps),
                  teacher_eval_every=fields.get("teacher_steps", args.teacher_steps))
    steps = 4 if args.quick else args.steps
    every = 2 if args.quick else args.eval_every
    cfg = D.DemoConfig(out_dir=args.work_dir, seed=args.seed, **{k: v for k, v in fields.items()
                                                                  if k not in ("student_steps", "student_eval_every")})
    log = D.Progress()
    os.makedirs(cfg.out_dir, exist_ok=True)
    t_start = time.perf_counter()
    data = S.write_task(os.path.join(cfg.out_dir, "task"), cfg.task, num_train=cfg.num_train,
                        num_test=cfg.num_test, seed=cfg.seed)
    mean_resp = D.mean_response_tokens(data.train, S.build_tokenizer())
    task = T.load_task("synthetic", data.test)

    teacher_dir = os.path.join(cfg.out_dir, "teacher")
    if not D.checkpoints(teacher_dir) or D.checkpoints(teacher_dir)[-1][0] != cfg.teacher_steps:
        log(f"teacher: {cfg.teacher_steps} AR steps")
        train(D.run_config(cfg, data, method="ar", steps=cfg.teacher_steps, lr=cfg.teacher_lr,
                           save_every=cfg.teacher_steps, name="teacher"))
    teacher_ckpt = D.checkpoints(teacher_dir)[-1][1]
    with runtime(ParallelLayout(), seed=1234 + cfg.seed):
        teacher_eval = D.evaluate_checkpoint(teacher_ckpt, data.tokenizer, task, ("ar",) + MODES, cfg)
    teacher_acc = teacher_eval["ar"].accuracy
    log(f"teacher: AR accuracy {teacher_acc:.3f}; as diffusion before conversion: static "
        f"{teacher_eval['static'].accuracy:.3f}, dynamic {teacher_eval['dynamic'].accuracy:.3f}")

    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    tokens_per_round: dict[str, dict[str, list[float]]] = {}
    timings: dict[str, float] = {}
    for method in args.methods:
        log(f"{method}: {steps} steps x {cfg.prompts_per_step} prompts, lr {args.lr} constant")
        t = time.perf_counter()
        run = train(D.run_config(cfg, data, method=method, steps=steps, lr=args.lr, min_lr=args.lr,
                                 save_every=every, teacher_checkpoint=teacher_ckpt, name=method,
                                 response_field=None if method == "off_policy" else "response"))
        timings[f"{method}_train_s"] = time.perf_counter() - t
        cum = D.cumulative_tokens(run["history"], method, mean_resp, cfg.prompts_per_step)
        curves[method] = {m: [(0.0, teacher_eval[m].accuracy)] for m in MODES}
        tokens_per_round[method] = {m: [teacher_eval[m].tokens_per_round] for m in MODES}
        t = time.perf_counter()
        with runtime(ParallelLayout(), seed=1234 + cfg.seed):
            for step, path in D.checkpoints(os.path.join(cfg.out_dir, method)):
                res = D.evaluate_checkpoint(path, data.tokenizer, task, MODES, cfg)
                for m in MODES:
                    curves[method][m].append((cum[step], res[m].accuracy))
                    tokens_per_round[method][m].append(res[m].tokens_per_round)
                log(f"  {method} step {step} ({cum[step]:.0f} tokens): static {res['static'].accuracy:.3f}, "
                    f"dynamic {res['dynamic'].accuracy:.3f} ({res['dynamic'].tokens_per_round:.2f} tok/round)")
        timings[f"{method}_eval_s"] = time.perf_counter() - t

    target = TARGET * teacher_acc
    reach = {m: {mode: tokens_to_reach(curves[m][mode], target) for mode in MODES} for m in curves}
    ratio = {m: {mode: (reach[m][mode] / reach["opdlm"][mode]
                        if "opdlm" in reach and reach[m][mode] and reach["opdlm"][mode] else None)
                 for mode in MODES} for m in curves}
    os.makedirs(args.results, exist_ok=True)
    name = "token_efficiency_quick" if args.quick else "token_efficiency"
    png = os.path.join(args.results, f"{name}.png")
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/token_efficiency.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "setup": {"task": cfg.task.__dict__, "num_train": data.num_train, "num_test": data.num_test,
                  "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size}, "block_size": cfg.block_size,
                  "threshold": cfg.threshold, "steps": steps, "eval_every": every, "lr": args.lr,
                  "prompts_per_step": cfg.prompts_per_step, "teacher_steps": cfg.teacher_steps,
                  "mean_response_tokens": mean_resp},
        "teacher": {m: teacher_eval[m].as_dict(with_samples=False) for m in ("ar",) + MODES},
        "target_accuracy": target,
        "curves": {m: {mode: [{"tokens": x, "accuracy": y, "tokens_per_round": tpr}
                              for (x, y), tpr in zip(curves[m][mode], tokens_per_round[m][mode])]
                       for mode in MODES} for m in curves},
        "tokens_to_95pct_teacher": reach,
        "ratio_to_opdlm": ratio,
        "timings_s": dict(timings, total=time.perf_counter() - t_start),
        "plot": os.path.relpath(png, ROOT),
    }
    result["reach"] = summarize(result)
    result["plot_backend"] = plot(result, png)
    with open(os.path.join(args.results, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    print_summary(result)
    log(f"wrote {os.path.join(args.results, name + '.json')} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
