"""Token efficiency of AR-to-diffusion conversion methods: three training seeds each, two tasks.

One job: for each synthetic task (``arithmetic``, ``sort``), pre-train one AR teacher (the demo's
``teacher_config``), then convert that same teacher into a block-4 student with every method and
training seed under the demo's conversion recipe (``conversion_config``: the same learning rate,
rollout settings and shifted student for every method), checkpoint every ``--eval-every`` steps,
and score each checkpoint on the held-out split with greedy static (1 token per round) and
threshold-0.9 decoding. Methods:

- ``opdlm``: the student's own rollouts, masks from its decoding trajectory, forward KL;
- ``random_mask``: own rollouts, random masks, forward KL ("OPDLM off" in the paper);
- ``off_policy``: the teacher's own (causal, T=1) responses, random masks, forward KL;
- ``sft``: the training file's responses, random masks, masked-diffusion cross-entropy (the
  standard AR-to-diffusion conversion).

Training tokens are the response tokens trained on (rollout tokens; the dataset's response tokens
for ``sft``). Reported per task, method and checkpoint: the mean and min/max over seeds of static
and threshold accuracy and tokens per round; per seed, the tokens needed to reach 50 / 80 / 90 /
95% of the teacher's accuracy (linear interpolation between checkpoints; a lower bound, the run's
whole budget, when it never does) and their ratio to OPDLM's; the spread over seeds at the end of
the budget; and the drop from static to threshold decoding. The plot shows each method's mean
with its min/max band.

The block grid (``diffusion.block_grid``, ``models/grid.py``) is a dimension (``--grids``): a
method converted on the absolute grid (SGLang's, lmdeploy's and JetEngine's) is reported as
``METHOD@absolute`` beside the response-grid runs, each scored on its own grid at every checkpoint
and, at the end of its budget, on the other grid too (trained on one grid, served on the other:
the paper's reference code's situation). The held-out prompts' share with ``P mod b != 0`` (where
the grids differ) is recorded per task.

Every run is its own process with a fixed thread count (``--threads``, recorded), ``--jobs`` of
them at a time. A finished run leaves ``curve.json`` in its directory and is not recomputed when
the benchmark is started again (it resumes; a run stopped midway starts over: its per-step token
counts lived in the process that trained it); ``--resummarize JSON`` recomputes the summary and the
plot from a result file's per-seed curves alone. The committed JSON names the commit it measured.

    python benchmarks/token_efficiency.py                      # both tasks, 4 methods, seeds 0 1 2
    python benchmarks/token_efficiency.py --tasks sort --methods opdlm sft --seeds 0 --quick
    python benchmarks/token_efficiency.py --resummarize benchmarks/results/token_efficiency.json
    python benchmarks/token_efficiency.py --methods opdlm --grids response absolute --name grid_efficiency
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("opdlm", "random_mask", "off_policy", "sft")
TASKS = ("arithmetic", "sort")
GRIDS = ("response", "absolute")
"""``models.grid.GRIDS``, restated so that ``--help`` imports nothing heavy (a test keeps them equal)."""
MODES = ("static", "dynamic")
FRACTIONS = (0.5, 0.8, 0.9, 0.95)
"""Fractions of the teacher's accuracy at which the tokens to reach them are reported."""


# --- curves and their summary (pure functions of the per-seed curves) ------------------------

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


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def summarize_method(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per checkpoint (the same steps in every seed): tokens, accuracy and tokens/round over seeds."""
    points = []
    for i, step in enumerate(p["step"] for p in runs[0]["points"]):
        at = [r["points"][i] for r in runs]
        if any(p["step"] != step for p in at):
            raise ValueError(f"seeds were checkpointed at different steps ({[p['step'] for p in at]})")
        row: dict[str, Any] = {"step": step, "tokens": _stats([p["tokens"] for p in at])}
        for mode in MODES:
            row[mode] = {"accuracy": _stats([p[mode]["accuracy"] for p in at]),
                         "tokens_per_round": _stats([p[mode]["tokens_per_round"] for p in at])}
        points.append(row)
    return points


def reach_table(runs_by_method: dict[str, list[dict[str, Any]]], teacher_accuracy: float) -> dict[str, Any]:
    """Tokens each seed needs to reach each fraction of the teacher (or its budget, as a lower bound),
    and the ratio of each method's mean to OPDLM's."""
    out: dict[str, Any] = {}
    for frac in FRACTIONS:
        target = frac * teacher_accuracy
        per: dict[str, Any] = {}
        for method, runs in runs_by_method.items():
            per[method] = {}
            for mode in MODES:
                seeds = []
                for r in runs:
                    curve = [(p["tokens"], p[mode]["accuracy"]) for p in r["points"]]
                    hit = tokens_to_reach(curve, target)
                    seeds.append({"seed": r["seed"], "tokens": hit, "budget": curve[-1][0]})
                reached = [s["tokens"] for s in seeds if s["tokens"] is not None]
                per[method][mode] = {
                    "per_seed": seeds,
                    "reached": f"{len(reached)}/{len(seeds)}",
                    # a seed that never reached counts with its whole budget: the mean is then a lower bound
                    "mean_tokens": statistics.fmean(s["tokens"] if s["tokens"] is not None else s["budget"]
                                                    for s in seeds),
                    "lower_bound": len(reached) < len(seeds),
                }
        for method in per:
            for mode in MODES:
                grid = method.partition("@")[2] or "response"  # compared with OPDLM on its own grid
                cell, ref = per[method][mode], per.get(label("opdlm", grid), {}).get(mode)
                ok = ref is not None and not ref["lower_bound"] and ref["mean_tokens"] > 0
                cell["ratio_to_opdlm"] = cell["mean_tokens"] / ref["mean_tokens"] if ok else None
        out[f"{round(100 * frac)}pct"] = {"target_accuracy": target, "methods": per}
    return out


def final_spread(runs_by_method: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """At the end of each method's budget: accuracy over seeds, its spread (max - min), and the drop
    from static to threshold decoding (the paper's robustness-to-parallel-decoding claim)."""
    out = {}
    for method, runs in runs_by_method.items():
        last = [r["points"][-1] for r in runs]
        acc = {mode: [p[mode]["accuracy"] for p in last] for mode in MODES}
        drop = [s - d for s, d in zip(acc["static"], acc["dynamic"])]
        out[method] = {
            "step": last[0]["step"],
            **{mode: dict(_stats(acc[mode]), spread=max(acc[mode]) - min(acc[mode]),
                          tokens_per_round=statistics.fmean(p[mode]["tokens_per_round"] for p in last))
               for mode in MODES},
            "static_minus_dynamic": _stats(drop),
        }
    return out


def label(method: str, grid: str) -> str:
    """A run's name in the summaries: the method, marked ``@absolute`` off the response grid."""
    return method if grid == "response" else f"{method}@{grid}"


def grid_table(runs_by_label: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per method converted on more than one grid: final accuracy (mean, min, max over seeds) and
    tokens per round, trained on each grid x decoded on each grid x decoding mode. Decoded on its
    own grid: the last checkpoint's scores; on another: the run's ``cross`` scores of that checkpoint."""
    by_method: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, runs in runs_by_label.items():
        method, _, grid = name.partition("@")
        by_method.setdefault(method, {})[grid or "response"] = runs
    out: dict[str, Any] = {}
    for method, grids in by_method.items():
        if len(grids) < 2:
            continue
        out[method] = {}
        for trained, runs in grids.items():
            cell: dict[str, Any] = {}
            for decoded in grids:
                scores = [r["points"][-1] if decoded == trained else r["cross"][decoded] for r in runs]
                cell[f"decoded_{decoded}"] = {
                    mode: {"accuracy": _stats([s[mode]["accuracy"] for s in scores]),
                           "tokens_per_round": statistics.fmean(s[mode]["tokens_per_round"] for s in scores)}
                    for mode in MODES}
            out[method][f"trained_{trained}"] = cell
    return out


def summarize_task(task: dict[str, Any]) -> dict[str, Any]:
    runs = task["runs"]
    teacher = task["teacher"]["ar"]["accuracy"]
    out = {
        "points": {m: summarize_method(r) for m, r in runs.items()},
        "reach": reach_table(runs, teacher),
        "final": final_spread(runs),
    }
    grids = grid_table(runs)
    if grids:
        out["grids"] = grids
    return out


# --- printing and plotting ---------------------------------------------------------------------

def _fmt_reach(cell: dict[str, Any]) -> str:
    tokens = f"{'>=' if cell['lower_bound'] else ''}{cell['mean_tokens'] / 1e3:.0f}K"
    ratio = "" if cell["ratio_to_opdlm"] is None else f" ({'>=' if cell['lower_bound'] else ''}" \
                                                       f"{cell['ratio_to_opdlm']:.1f}x)"
    return f"{tokens}{ratio} {cell['reached']}"


def print_summary(result: dict[str, Any]) -> None:
    for name, task in result["tasks"].items():
        s = task["summary"]
        teacher = task["teacher"]["ar"]["accuracy"]
        print(f"\n== {name}: teacher AR accuracy {teacher:.3f}; seeds {result['setup']['seeds']}")
        print(f"{'method':<12} {'mode':<8} {'final acc mean [min,max]':>26} {'tok/round':>9} "
              + " ".join(f"{f:>22}" for f in s["reach"]))
        for method, fin in s["final"].items():
            for mode in MODES:
                f = fin[mode]
                cells = [_fmt_reach(s["reach"][k]["methods"][method][mode]) for k in s["reach"]]
                print(f"{method:<12} {mode:<8} {f['mean']:>10.3f} [{f['min']:.2f}, {f['max']:.2f}]{'':>7} "
                      f"{f['tokens_per_round']:>9.2f} " + " ".join(f"{c:>22}" for c in cells))
        print("tokens to reach a fraction of the teacher (mean over seeds, x OPDLM's; '>=': some seed never "
              "did, its whole budget counted); static minus threshold accuracy at the end: "
              + ", ".join(f"{m} {v['static_minus_dynamic']['mean']:+.3f}" for m, v in s["final"].items()))
        for method, table in s.get("grids", {}).items():
            share = task["teacher"].get("unaligned_share")
            print(f"{method}: trained on one grid, decoded on each (final accuracy mean [min, max]; "
                  f"{share:.0%} of the held-out prompts have P mod b != 0)" if share is not None else
                  f"{method}: trained on one grid, decoded on each")
            for trained, row in table.items():
                for decoded, cell in row.items():
                    print(f"  {trained:<18} {decoded:<18} " + "  ".join(
                        f"{mode} {c['accuracy']['mean']:.3f} [{c['accuracy']['min']:.2f}, {c['accuracy']['max']:.2f}]"
                        f" {c['tokens_per_round']:.2f} tok/round" for mode, c in cell.items()))


def plot(result: dict[str, Any], png: str) -> Optional[str]:
    """The accuracy-vs-tokens panels (task x decoding mode) to ``png``: its path relative to the
    repository, or None without matplotlib."""
    from nemo_opdlm.eval.plot import Panel, Series, save_line_plot

    panels = []
    for name, task in result["tasks"].items():
        teacher = task["teacher"]["ar"]["accuracy"]
        for mode in MODES:
            series = []
            for method, points in task["summary"]["points"].items():
                acc = [p[mode]["accuracy"] for p in points]
                series.append(Series(method, [p["tokens"]["mean"] for p in points], [a["mean"] for a in acc],
                                     lo=[a["min"] for a in acc], hi=[a["max"] for a in acc]))
            label = "static (1 tok/round)" if mode == "static" else "threshold 0.9"
            panels.append(Panel(f"{name}: {label}", "training tokens", "held-out accuracy", series,
                                hlines=[("teacher (AR)", teacher), ("95% of teacher", 0.95 * teacher)]))
    seeds = len(result["setup"]["seeds"])
    written = save_line_plot(png, panels, title=f"AR -> block diffusion (block 4): mean and min/max of {seeds} seeds",
                             columns=len(MODES))
    return None if written is None else os.path.relpath(written, ROOT)


def resummarize(path: str, argv: list[str]) -> int:
    """Recompute the summaries and the plot of an existing result file from its per-seed curves."""
    with open(path) as f:
        result = json.load(f)
    for task in result["tasks"].values():
        task["summary"] = summarize_task(task)
    result["summarized_by"] = "python benchmarks/token_efficiency.py " + " ".join(argv)
    png = os.path.join(ROOT, result["plot"]) if result.get("plot") else os.path.splitext(path)[0] + ".png"
    result.pop("plot_backend", None)  # files written before eval/plot.py was matplotlib only
    result["plot"] = plot(result, png)
    _write_json(path, result)
    print_summary(result)
    return 0


# --- running ------------------------------------------------------------------------------------

def _write_json(path: str, data: Any) -> None:
    """Atomically: a crash leaves the previous file or the new one, never half of one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[Any]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _demo_config(args: argparse.Namespace, task: str):
    from nemo_opdlm import demo as D
    from nemo_opdlm.eval import synthetic as S

    fields: dict[str, Any] = dict(D.QUICK) if args.quick else {}
    for key in ("teacher_steps", "num_test"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    fields.pop("student_steps", None)
    fields.pop("student_eval_every", None)
    return D.DemoConfig(out_dir=os.path.join(args.work_dir, task), task=S.task_config(task), seed=0, **fields)


def prepare_task(args: argparse.Namespace, task: str, log) -> dict[str, Any]:
    """The task files and its teacher (trained once; reused when its final checkpoint exists)."""
    from nemo_opdlm import demo as D
    from nemo_opdlm.recipes import tiny
    from nemo_opdlm.eval import synthetic as S
    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from nemo_opdlm.training.loop import train

    cfg = _demo_config(args, task)
    os.makedirs(cfg.out_dir, exist_ok=True)
    cached = _read_json(os.path.join(cfg.out_dir, "teacher.json"))
    if cached is not None and cached.get("teacher_steps") == cfg.teacher_steps:
        return teacher_on_grids(cached, args.grids, cfg, log)
    data = S.write_task(os.path.join(cfg.out_dir, "task"), cfg.task, num_train=cfg.num_train,
                        num_test=cfg.num_test, seed=cfg.seed)
    teacher_dir = os.path.join(cfg.out_dir, "teacher")
    log(f"{task}: teacher, {cfg.teacher_steps} AR steps")
    t = time.perf_counter()
    train(tiny.teacher_config(**D.demo_paths(cfg), save_dir=teacher_dir, steps=cfg.teacher_steps,
                           save_every=cfg.teacher_steps, **D._sizes(cfg)))
    train_s = time.perf_counter() - t
    ckpt = D.checkpoints(teacher_dir)[-1][1]
    shift = tiny.conversion_config().diffusion.shift_logits
    with runtime(ParallelLayout(), seed=1234) as rt:
        res = D.evaluate_checkpoint(rt.ctx, ckpt, data.tokenizer, T.load_task(data.eval_format, data.test),
                                    ("ar",) + MODES, cfg, shift_logits=shift)
    import torch

    info = {
        "teacher_steps": cfg.teacher_steps, "checkpoint": ckpt, "train_s": train_s, "family": data.family,
        "threads": torch.get_num_threads(),
        "data": {"train": data.train, "test": data.test, "tokenizer": data.tokenizer, "num_train": data.num_train,
                 "num_test": data.num_test, "eval_format": data.eval_format,
                 "mean_response_tokens": D.mean_response_tokens(data.train, S.build_tokenizer(data.family))},
        "task_config": cfg.task.__dict__,
        **{m: res[m].as_dict(with_samples=False) for m in ("ar",) + MODES},
    }
    _write_json(os.path.join(cfg.out_dir, "teacher.json"), info)
    log(f"{task}: teacher AR accuracy {res['ar'].accuracy:.3f}; as a shifted diffusion model before conversion: "
        f"static {res['static'].accuracy:.3f}, threshold {res['dynamic'].accuracy:.3f}")
    return teacher_on_grids(info, args.grids, cfg, log)


def teacher_on_grids(info: dict[str, Any], grids: list[str], cfg, log) -> dict[str, Any]:
    """``info`` (teacher.json) with the teacher's weights scored as a student on each of ``grids``
    (every conversion's step 0; the response grid's are ``info[mode]``) and the held-out prompts'
    share with ``P mod b != 0``, computed once and saved."""
    missing = [g for g in grids if g != "response" and g not in info.get("as_student", {})]
    if not missing and "unaligned_share" in info:
        return info
    from nemo_opdlm import demo as D
    from nemo_opdlm.recipes import tiny
    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    data = info["data"]
    task = T.load_task(data["eval_format"], data["test"])
    convert = tiny.conversion_config()
    with runtime(ParallelLayout(), seed=1234) as rt:
        for grid in missing:
            res = D.evaluate_checkpoint(rt.ctx, info["checkpoint"], data["tokenizer"], task, MODES, cfg,
                                        shift_logits=convert.diffusion.shift_logits, block_grid=grid, as_student=False)
            info.setdefault("as_student", {})[grid] = {m: res[m].as_dict(with_samples=False) for m in MODES}
            log(f"teacher as a student on the {grid} grid: static {res['static'].accuracy:.3f}, "
                f"threshold {res['dynamic'].accuracy:.3f}")
    info["unaligned_share"] = unaligned_share(task, data["tokenizer"], convert.diffusion.block_size)
    _write_json(os.path.join(cfg.out_dir, "teacher.json"), info)
    return info


def unaligned_share(task, tokenizer_dir: str, block_size: int) -> float:
    """Share of the task's prompts, as the evaluation encodes them, whose length is not a multiple of
    ``block_size``: where the absolute and the response grids cut different blocks."""
    from transformers import AutoTokenizer

    from nemo_opdlm.eval import tasks as T

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = [T.build_prompt(task, ex, tok, chat=False) for ex in task.examples]
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]]
    return sum(n % block_size != 0 for n in lengths) / len(lengths)


def run_dir(args: argparse.Namespace, task: str, method: str, seed: int, grid: str = "response") -> str:
    return os.path.join(args.work_dir, task, f"{label(method, grid).replace('@', '_')}_seed{seed}")


def budget(args: argparse.Namespace, method: str) -> int:
    return args.steps if method == "opdlm" else args.baseline_steps or args.steps


def one_run(args: argparse.Namespace, task: str, method: str, seed: int, grid: str = "response") -> int:
    """One conversion (this process) on ``grid``: train, score every checkpoint on that grid and the
    last one on every other grid of ``--grids`` too, write ``curve.json``.

    With ``--until-ratio`` a baseline's schedule spans its token cap (``cap.json``: that many times
    OPDLM's tokens to 90% of the teacher) and it trains in segments of ``--segment-steps``
    (``train.exit_interval``, each resuming the last), scored as they end, until every fraction of
    ``FRACTIONS`` of the teacher is reached under both decodings or the cap is; scored checkpoints
    but the last are removed (disk)."""
    import shutil

    import torch

    from nemo_opdlm import demo as D
    from nemo_opdlm.recipes import tiny
    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from nemo_opdlm.runtime.seeding import demo_train_seed
    from nemo_opdlm.training.loop import train

    torch.set_num_threads(args.threads)
    teacher = _read_json(os.path.join(args.work_dir, task, "teacher.json"))
    assert teacher is not None, "prepare_task runs first"
    cfg = _demo_config(args, task)
    out = run_dir(args, task, method, seed, grid)
    if os.path.isdir(out):  # stopped midway (curve.json missing): its token counts went with its process
        print(f"[token_efficiency] {out} is an unfinished run: starting it over", flush=True)
        shutil.rmtree(out)
    every = max(1, args.eval_every)
    data = teacher["data"]
    step_tokens = cfg.prompts_per_step * data["mean_response_tokens"]  # about; the curve counts the real ones
    cap = _read_json(os.path.join(args.work_dir, task, "cap.json")) if _extends(args, method) else None
    steps = budget(args, method) if cap is None else max(budget(args, method), math.ceil(cap["tokens"] / step_tokens))
    run_cfg = tiny.conversion_config(
        teacher_checkpoint=teacher["checkpoint"], data_path=data["train"], tokenizer=data["tokenizer"], save_dir=out,
        method=method, steps=steps, save_every=every, seed=demo_train_seed(seed), prompts_per_step=cfg.prompts_per_step,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        response_field=None if method == "off_policy" else "response", block_grid=grid)
    if cap is not None:
        segment = max(every, args.segment_steps // every * every)
        run_cfg = dataclasses.replace(run_cfg, train=dataclasses.replace(run_cfg.train, exit_interval=segment))
    task_obj = T.load_task(data["eval_format"], data["test"])
    # step 0: the teacher's weights read as the student (every method's starting point), on this grid
    start = teacher if grid == "response" else teacher["as_student"][grid]
    points = [{"step": 0, "tokens": 0.0, **{m: {k: start[m][k] for k in ("accuracy", "tokens_per_round")}
                                            for m in MODES}}]
    history: list[dict[str, Any]] = []
    cross: dict[str, Any] = {}
    train_s = eval_s = 0.0
    stopped = "budget"
    while True:  # train() runs its own runtime; the scoring one is started after it
        t = time.perf_counter()
        run = train(run_cfg)
        train_s += time.perf_counter() - t
        history += run["history"]
        tokens = D.cumulative_tokens(history, method, data["mean_response_tokens"], cfg.prompts_per_step)
        t = time.perf_counter()
        ckpts = D.checkpoints(out)
        with runtime(ParallelLayout(), seed=1234) as rt:
            for step, path in ckpts:
                if step > points[-1]["step"]:
                    res = D.evaluate_checkpoint(rt.ctx, path, data["tokenizer"], task_obj, MODES, cfg)
                    points.append({"step": step, "tokens": tokens[step], **_scores(res)})
        eval_s += time.perf_counter() - t
        if cap is None or run["status"] != "exited":
            if cap is not None:  # the schedule spans the cap: its last step ends the run there
                stopped = "reached" if _reached_all(points, teacher) else "cap"
            break
        for _, path in ckpts[:-1]:  # scored; the last one is where the next segment resumes
            shutil.rmtree(path, ignore_errors=True)
        if _reached_all(points, teacher) or points[-1]["tokens"] >= cap["tokens"]:
            stopped = "reached" if _reached_all(points, teacher) else "cap"
            break
    with runtime(ParallelLayout(), seed=1234) as rt:
        last = D.checkpoints(out)[-1][1]
        for other in (g for g in args.grids if g != grid):  # served on a grid it was not trained on
            res = D.evaluate_checkpoint(rt.ctx, last, data["tokenizer"], task_obj, MODES, cfg,
                                        block_grid=other, as_student=False)
            cross[other] = _scores(res)
    kl = [h["kl"] for h in history if "kl" in h]
    _write_json(os.path.join(out, "curve.json"), {
        "task": task, "method": method, "seed": seed, "grid": grid, "steps": points[-1]["step"],
        "scheduled_steps": steps, "stopped": stopped if cap is not None else "budget",
        "cap_tokens": None if cap is None else cap["tokens"], "points": points, "cross": cross,
        "train_s": train_s, "eval_s": eval_s, "threads": args.threads,
        "first_kl": kl[:5], "grad_norm_mean": statistics.fmean(h["grad_norm"] for h in history),
    })
    return 0


def _extends(args: argparse.Namespace, method: str) -> bool:
    """Whether this method's run continues past its budget towards the cap (``--until-ratio``)."""
    return args.until_ratio is not None and method != "opdlm"


def _reached_all(points: list[dict[str, Any]], teacher: dict[str, Any]) -> bool:
    """Every fraction of ``FRACTIONS`` of the teacher's (AR) accuracy reached under both decodings."""
    target = max(FRACTIONS) * teacher["ar"]["accuracy"]
    return all(any(p[m]["accuracy"] >= target for p in points) for m in MODES)


def opdlm_tokens_to(runs: list[dict[str, Any]], teacher: dict[str, Any], fraction: float = 0.9,
                    mode: str = "dynamic") -> tuple[float, bool]:
    """OPDLM's mean tokens to ``fraction`` of the teacher's AR accuracy under ``mode`` over its seeds,
    and whether every seed got there (else the mean counts a seed's whole budget: a lower bound).
    (``teacher[mode]`` is the teacher read as a diffusion student before conversion: not the bar.)"""
    target = fraction * teacher["ar"]["accuracy"]
    reached = [tokens_to_reach([(p["tokens"], p[mode]["accuracy"]) for p in r["points"]], target) for r in runs]
    values = [t if t is not None else r["points"][-1]["tokens"] for t, r in zip(reached, runs)]
    return statistics.fmean(values), all(t is not None for t in reached)


def _scores(res: dict[str, Any]) -> dict[str, Any]:
    return {m: {"accuracy": res[m].accuracy, "tokens_per_round": res[m].tokens_per_round} for m in MODES}


def _child(args: argparse.Namespace, task: str, method: str, seed: int, grid: str) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", task, method, str(seed), "--work-dir", args.work_dir,
           "--steps", str(args.steps), "--eval-every", str(args.eval_every), "--threads", str(args.threads),
           "--grid", grid, "--grids", *args.grids]
    for key in ("baseline_steps", "teacher_steps", "num_test", "until_ratio", "segment_steps"):
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    logf = open(run_dir(args, task, method, seed, grid) + ".log", "w")
    return subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)


def run_all(args: argparse.Namespace, log) -> dict[str, Any]:
    """Every (task, method, seed) not finished yet, ``--jobs`` at a time; returns the task results."""
    tasks = {task: prepare_task(args, task, log) for task in args.tasks}
    todo = [(t, m, s, g) for t in args.tasks for g in args.grids for m in args.methods for s in args.seeds
            if _read_json(os.path.join(run_dir(args, t, m, s, g), "curve.json")) is None]
    done = len(args.tasks) * len(args.grids) * len(args.methods) * len(args.seeds) - len(todo)
    log(f"{len(todo)} runs to do ({done} finished earlier), {args.jobs} at a time, {args.threads} thread(s) each")
    todo.sort(key=lambda k: k[1] != "opdlm")  # OPDLM first: with --until-ratio its tokens set the baselines' cap
    running: list[tuple[tuple[str, str, int, str], subprocess.Popen, float]] = []
    failed = []
    while todo or running:
        while todo and len(running) < args.jobs:
            if _extends(args, todo[0][1]) and not _cap_ready(args, todo[0], running, log):
                break
            key = todo.pop(0)
            running.append((key, _child(args, *key), time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            key, proc, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            curve = _read_json(os.path.join(run_dir(args, *key), "curve.json"))
            if proc.returncode or curve is None:
                failed.append(key)
                log(f"  {key} failed (rc {proc.returncode}); see {run_dir(args, *key)}.log")
                continue
            last = curve["points"][-1]
            log(f"  {key[0]} {label(key[1], key[3])} seed {key[2]}: {curve['steps']} steps, {last['tokens'] / 1e3:.0f}K tokens, static "
                f"{last['static']['accuracy']:.2f}, threshold {last['dynamic']['accuracy']:.2f} "
                f"({last['dynamic']['tokens_per_round']:.2f} tok/round) in {time.perf_counter() - start:.0f}s")
    if failed:
        raise SystemExit(f"token_efficiency: {len(failed)} run(s) failed: {failed}")
    out = {}
    for task, teacher in tasks.items():
        runs = {label(m, g): [_read_json(os.path.join(run_dir(args, task, m, s, g), "curve.json")) for s in args.seeds]
                for g in args.grids for m in args.methods}
        out[task] = {"teacher": teacher, "runs": runs}
    return out


def _cap_ready(args: argparse.Namespace, key: tuple[str, str, int, str], running: list, log) -> bool:
    """Whether the baselines of ``key``'s task may start: their cap written (``cap.json``), once every
    OPDLM run of the task on ``key``'s grid has finished."""
    task, _, _, grid = key
    path = os.path.join(args.work_dir, task, "cap.json")
    if _read_json(path) is not None:
        return True
    if any(k[0] == task and k[1] == "opdlm" for k, _, _ in running):
        return False
    runs = [_read_json(os.path.join(run_dir(args, task, "opdlm", s, grid), "curve.json")) for s in args.seeds]
    if any(r is None for r in runs):
        raise SystemExit(f"--until-ratio needs OPDLM's runs of {task} (seeds {args.seeds}); include --methods opdlm")
    teacher = _read_json(os.path.join(args.work_dir, task, "teacher.json"))
    tokens, all_reached = opdlm_tokens_to(runs, teacher)
    cap = {"tokens": args.until_ratio * tokens, "ratio": args.until_ratio, "opdlm_tokens_to_90pct_dynamic": tokens,
           "opdlm_reached_in_every_seed": all_reached}
    _write_json(path, cap)
    log(f"  {task}: OPDLM reaches 90% of the teacher (threshold) at {tokens / 1e3:.0f}K tokens on average; "
        f"baselines run until {max(FRACTIONS):.0%} or {cap['tokens'] / 1e3:.0f}K tokens ({args.until_ratio:g}x)")
    return True


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/opdlm_token_efficiency", help="checkpoints and per-run curves")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (same teacher)")
    p.add_argument("--steps", type=int, default=300, help="OPDLM's conversion steps")
    p.add_argument("--baseline-steps", type=int, default=None, help="the other methods' steps (default: --steps)")
    p.add_argument("--eval-every", type=int, default=50, help="checkpoint (= token budget) spacing in steps")
    p.add_argument("--teacher-steps", type=int, default=None, help="default: the demo's")
    p.add_argument("--num-test", type=int, default=None, help="held-out problems (default: the demo's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (fixed, recorded)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one process each)")
    p.add_argument("--grids", nargs="+", default=["response"], choices=GRIDS,
                   help="block grids to convert on (diffusion.block_grid); each run is also scored on the others")
    p.add_argument("--grid", default="response", choices=GRIDS, help=argparse.SUPPRESS)
    p.add_argument("--name", default="token_efficiency", help="results file name (JSON and plot) under --results")
    p.add_argument("--until-ratio", type=float, default=None, metavar="R",
                   help="baselines train on past their budget until they reach every fraction of the teacher "
                        "(both decodings) or R x OPDLM's mean tokens to 90%% (threshold); OPDLM runs first")
    p.add_argument("--segment-steps", type=int, default=300,
                   help="with --until-ratio: steps between checks of the stopping rule (train.exit_interval)")
    p.add_argument("--quick", action="store_true", help="a smoke run: the demo's CI sizes, 4 steps")
    p.add_argument("--resummarize", metavar="JSON", help="only recompute the summary and plot of a result file")
    p.add_argument("--one", nargs=3, metavar=("TASK", "METHOD", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.one is None:
        args.steps, args.eval_every = 4, 2
        args.baseline_steps = None
    for name in ("steps", "eval_every", "threads", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize, argv)
    if args.one:
        task, method, seed = args.one
        return one_run(args, task, method, int(seed), args.grid)
    from nemo_opdlm import demo as D

    log = D.Progress()
    t_start = time.perf_counter()
    tasks = run_all(args, log)
    for task in tasks.values():
        task["summary"] = summarize_task(task)
    os.makedirs(args.results, exist_ok=True)
    name = f"{args.name}_quick" if args.quick else args.name
    png = os.path.join(args.results, f"{name}.png")
    result = {
        "command": "python benchmarks/token_efficiency.py " + " ".join(argv),
        "commit": commit(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {"seeds": args.seeds, "methods": args.methods, "grids": args.grids,
                  "steps": {m: budget(args, m) for m in args.methods},
                  "eval_every": args.eval_every, "threads_per_run": args.threads, "parallel_runs": args.jobs,
                  "recipe": "nemo_opdlm.recipes.tiny.conversion_config (tiny:tiny_convert_4l_tp1_pp1_1g)",
                  "conversion": _conversion_summary()},
        "tasks": tasks,
        "wall_s": time.perf_counter() - t_start,
    }
    result["plot"] = plot(result, png)
    _write_json(os.path.join(args.results, f"{name}.json"), result)
    print_summary(result)
    log(f"wrote {os.path.join(args.results, name + '.json')} and {png}")
    return 0


def _conversion_summary() -> dict[str, Any]:
    from nemo_opdlm.config import to_dict
    from nemo_opdlm.recipes import tiny

    cfg = tiny.conversion_config()
    return {k: to_dict(getattr(cfg, k)) for k in ("diffusion", "rollout", "optim")} | {
        "prompts_per_step": cfg.train.prompts_per_step}


if __name__ == "__main__":
    sys.exit(main())
