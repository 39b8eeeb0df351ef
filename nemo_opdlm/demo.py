"""``opdlm demo``: the whole method on a CPU in minutes, on a task generated in code.

One job: run the pipeline a newcomer wants to see, end to end, with the same Megatron stack and
trainer as a real job, and show the result:

1. write a synthetic task (``eval/synthetic.py``: multi-step arithmetic by default, ``--task sort``
   for sorting letters): train / held-out JSONL + tokenizer;
2. pre-train a tiny AR teacher from scratch on the training responses (``recipes.tiny.teacher_config``);
3. convert it into a block-diffusion student with OPDLM (``recipes.tiny.conversion_config``, the
   recipe ``tiny:tiny_convert_4l_tp1_pp1_1g``: the teacher loaded from step 2's checkpoint, the
   student initialised with its weights);
4. evaluate on the held-out split: the teacher (AR decoding), the teacher's weights read as a
   block-diffusion model before conversion, and the student (static: 1 token per round; dynamic:
   confidence threshold) at every saved checkpoint;
5. print a table, save ``demo_results.json`` and a PNG of accuracy against training tokens.

Non-goals: the GPU recipes' settings (the sizes and the conversion settings here are for a 0.8M-
parameter teacher that has to convert in two minutes on 2 cores; ``recipes.tiny.conversion_config``
says why each differs from the paper's).
Training tokens are response tokens the model trained on: dataset responses for the AR teacher,
the student's own rollout tokens for OPDLM (T in the paper's FLOPs formula).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

from nemo_opdlm.eval import synthetic as S


def _train_seed(seed: int) -> int:
    """``runtime.seeding.demo_train_seed``, imported when used: seeding imports torch, and
    ``opdlm demo --help`` must answer without it."""
    from nemo_opdlm.runtime.seeding import demo_train_seed

    return demo_train_seed(seed)


@dataclass(kw_only=True)
class DemoConfig:
    """Sizes of the demo; the defaults finish in under 5 minutes on 2 CPU cores.

    The conversion's own settings (learning rate, rollouts, the shifted student) are not here: they
    are ``recipes.tiny.conversion_config``, the recipe a user names as ``tiny:tiny_convert_4l_tp1_pp1_1g``.
    """

    out_dir: str = "runs/demo"
    """Where the task, checkpoints, results and the plot go."""
    task: S.TaskConfig = field(default_factory=S.ArithmeticConfig)
    """The synthetic task family and its difficulty knobs (``S.ArithmeticConfig`` or ``S.SortConfig``)."""
    num_train: int = 4000
    """Training problems (responses for the teacher; prompts for the conversion)."""
    num_test: int = 100
    """Held-out problems scored at every evaluation."""
    hidden_size: int = 128
    num_layers: int = 4
    teacher_steps: int = 750
    """AR pre-training steps of the teacher (the arithmetic teacher scores 0.99 from step 750 on)."""
    student_steps: int = 300
    """OPDLM conversion steps."""
    prompts_per_step: int = 32
    """Rows per optimizer step (teacher) / rollouts per step (student)."""
    teacher_eval_every: int = 250
    student_eval_every: int = 50
    seed: int = 0
    """Task sampling and training seed (the trainers' ``train.seed`` is 1234 + seed)."""

    def __post_init__(self) -> None:
        from nemo_opdlm.errors import ConfigError

        for name in ("num_train", "num_test", "teacher_steps", "student_steps", "prompts_per_step",
                     "teacher_eval_every", "student_eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"demo.{name} must be >= 1, got {getattr(self, name)}")
        S.family_of(self.task)  # a known family


QUICK = dict(num_train=200, num_test=16, hidden_size=64, num_layers=2, teacher_steps=20, student_steps=5,
             teacher_eval_every=10, student_eval_every=5, prompts_per_step=8)
"""The CI-sized run: teacher 20 steps, student 5 steps (tests/test_demo.py)."""




def demo_paths(cfg: DemoConfig) -> dict[str, str]:
    """Where the demo's stages read and write, under ``cfg.out_dir``."""
    task = os.path.join(cfg.out_dir, "task")
    return dict(data_path=os.path.join(task, "train.jsonl"), tokenizer=os.path.join(task, "tokenizer"))


def _sizes(cfg: DemoConfig) -> dict[str, Any]:
    return dict(prompts_per_step=cfg.prompts_per_step, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                seed=_train_seed(cfg.seed))


# --- helpers shared with the benchmark ---------------------------------------------------------

def step_tokens(entry: dict[str, float], method: str, mean_response_tokens: float, prompts_per_step: int) -> float:
    """Response tokens one step trained on (one process: the rollout metrics are this rank's).

    Own or teacher rollouts: the rollout's valid tokens. 'ar': the loss tokens (every valid
    response token). Dataset responses with random masks ('sft', 'off_policy' on the file's
    responses), whose loss covers only the masked part: the mean response length x prompts.
    """
    if "rollout/tokens_generated" in entry:
        return float(entry["rollout/tokens_generated"])
    if method == "ar" and "train/loss_tokens" in entry:
        return float(entry["train/loss_tokens"])
    return mean_response_tokens * prompts_per_step


def mean_response_tokens(path: str, tokenizer) -> float:
    with open(path) as f:
        lens = [len(tokenizer(json.loads(line)["response"])["input_ids"]) + 1 for line in f]  # + EOS
    return sum(lens) / len(lens)


def checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every saved checkpoint, oldest first."""
    from nemo_opdlm.checkpoint.run_dir import step_dirs

    return step_dirs(save_dir)


def cumulative_tokens(history: Sequence[dict[str, float]], method: str, mean_resp: float,
                      prompts: int) -> dict[int, float]:
    """step -> response tokens trained on up to and including that step."""
    total, out = 0.0, {0: 0.0}
    for entry in history:
        total += step_tokens(entry, method, mean_resp, prompts)
        out[int(entry["step"])] = total
    return out


def evaluate_checkpoint(parallel, ckpt: str, tokenizer_dir: str, task, modes: Sequence[str], cfg: DemoConfig,
                        shift_logits: Optional[bool] = None, block_grid: Optional[str] = None,
                        as_student: bool = True) -> dict[str, Any]:
    """Accuracy / tokens-per-round / tokens-per-second of one checkpoint in each decoding mode
    (greedy; ``shift_logits``: read the weights as a shifted student, default the checkpoint's;
    ``block_grid``: the grid, default the checkpoint's), loaded at ``parallel``'s layout (the
    runtime's ``ctx``). ``as_student=False``: an AR checkpoint read as a student (the weights every
    conversion starts from), on whatever grid it is asked, since it was never trained on one; a
    student decoded on a grid other than its own is refused."""
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.eval.evaluate import DecodeSettings, evaluate
    from nemo_opdlm.recipes.tiny import MASK_ID, MAX_NEW_TOKENS

    model = load_model(parallel, ckpt=ckpt, tokenizer=tokenizer_dir, mask_token_id=MASK_ID, shift_logits=shift_logits,
                       block_grid=block_grid, allow_grid_mismatch=not as_student)
    out = {}
    for mode in modes:  # the evaluation's decoding defaults: greedy, threshold 0.9, the model's block size
        settings = DecodeSettings(mode=mode, max_new_tokens=MAX_NEW_TOKENS, chat_template="never",
                                  batch_size=min(64, cfg.num_test), seed=cfg.seed)
        out[mode] = evaluate(model.chunks, model.tokenizer, task, settings, diffusion=model.diffusion)
    return out


class Progress:
    """Timestamped progress lines (elapsed time since the start)."""

    def __init__(self, write: Callable[[str], None] = print) -> None:
        self.start = time.perf_counter()
        self.write = write

    def __call__(self, msg: str) -> None:
        t = time.perf_counter() - self.start
        self.write(f"[demo {int(t) // 60:d}:{int(t) % 60:02d}] {msg}")
        sys.stdout.flush()


# --- the demo ----------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig, log: Optional[Progress] = None) -> dict[str, Any]:
    """Run all stages; returns the results (also written to ``out_dir/demo_results.json``)."""
    from nemo_opdlm.recipes.tiny import conversion_config, teacher_config
    from nemo_opdlm.training.loop import train

    log = log or Progress()
    os.makedirs(cfg.out_dir, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data, mean_resp = _write_task(cfg, log)

    log(f"2/4 AR teacher: {cfg.num_layers} layers x {cfg.hidden_size}, {cfg.teacher_steps} steps of "
        f"{cfg.prompts_per_step} responses (distill.method=ar)")
    t = time.perf_counter()
    paths = demo_paths(cfg)
    teacher_run = train(teacher_config(**paths, save_dir=os.path.join(cfg.out_dir, "teacher"), steps=cfg.teacher_steps,
                                       save_every=cfg.teacher_eval_every, **_sizes(cfg)))
    _check_finished(teacher_run, "the AR teacher's training", cfg.teacher_steps)
    timings["teacher_train_s"] = time.perf_counter() - t
    teacher_final = checkpoints(os.path.join(cfg.out_dir, "teacher"))[-1][1]

    convert = conversion_config(**paths, teacher_checkpoint=teacher_final, save_dir=os.path.join(cfg.out_dir, "student"),
                                steps=cfg.student_steps, save_every=cfg.student_eval_every, **_sizes(cfg))
    r = convert.rollout
    log(f"3/4 OPDLM conversion (recipe tiny:tiny_convert_4l_tp1_pp1_1g): {cfg.student_steps} steps of "
        f"{cfg.prompts_per_step} own rollouts (block {convert.diffusion.block_size}, thr {r.threshold}, "
        f"{r.static_fraction:.0%} of rows "
        f"static, T={r.temperature:g}, shift_logits={convert.diffusion.shift_logits}), teacher = {teacher_final}")
    t = time.perf_counter()
    student_run = train(convert)
    _check_finished(student_run, "the OPDLM conversion", cfg.student_steps)
    timings["student_train_s"] = time.perf_counter() - t

    log(f"4/4 evaluation on {cfg.num_test} held-out problems (greedy)")
    t = time.perf_counter()
    tokens = {"teacher": cumulative_tokens(teacher_run["history"], "ar", mean_resp, cfg.prompts_per_step),
              "student": cumulative_tokens(student_run["history"], "opdlm", mean_resp, cfg.prompts_per_step)}
    curves, final_teacher, final_student = _evaluate_runs(cfg, data, convert, tokens, log)
    timings["eval_s"] = time.perf_counter() - t
    results = _report(cfg, data, convert, curves, final_teacher, final_student, tokens, timings, t0)
    log(f"done in {timings['total_s']:.0f}s: {os.path.join(cfg.out_dir, 'demo_results.json')}, "
        f"plot {results['plot'] or '(none: matplotlib is not installed)'}")
    return results


class DemoStopped(Exception):
    """A training stage ended before its last step (pre-empted by a signal): nothing to evaluate."""


def _check_finished(run: dict[str, Any], what: str, steps: int) -> None:
    """Stop the demo when ``run`` did not complete: scoring a half-trained stage as the result would
    print a table that means nothing."""
    if run["status"] != "completed":
        raise DemoStopped(f"{what} stopped at step {run['step']} of {steps} ({run['status']}): nothing was evaluated; "
                          "run `opdlm demo --overwrite` again")


def _write_task(cfg: DemoConfig, log: Progress) -> tuple[Any, float]:
    """Stage 1: the task files (``S.TaskData``) and the mean response length in tokens."""
    data = S.write_task(os.path.join(cfg.out_dir, "task"), cfg.task, num_train=cfg.num_train,
                        num_test=cfg.num_test, seed=cfg.seed)
    tok = S.build_tokenizer(data.family)
    mean_resp = mean_response_tokens(data.train, tok)
    log(f"1/4 task: {data.num_train} train / {data.num_test} held-out {data.family} problems "
        f"(e.g. {json.loads(open(data.test).readline())['prompt']!r}), vocab {len(tok)}, "
        f"mean response {mean_resp:.1f} tokens")
    return data, mean_resp


def _evaluate_runs(cfg: DemoConfig, data: Any, convert: Any, tokens: dict[str, dict[int, float]],
                   log: Progress) -> tuple[dict[str, list[tuple[float, float]]], dict[str, Any], dict[str, Any]]:
    """Stage 4: every teacher checkpoint (AR; the last one also read as the student's starting point)
    and every student checkpoint on the held-out split. Returns the accuracy curves and the final
    teacher's and student's results per decoding mode."""
    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    task = T.load_task(data.eval_format, data.test)
    teacher_ckpts = checkpoints(os.path.join(cfg.out_dir, "teacher"))
    teacher_final = teacher_ckpts[-1][1]
    curves: dict[str, list[tuple[float, float]]] = {"teacher_ar": [(0.0, 0.0)], "student_static": [],
                                                    "student_dynamic": []}
    final_teacher: dict[str, Any] = {}
    final_student: dict[str, Any] = {}
    with runtime(ParallelLayout(), seed=_train_seed(cfg.seed)) as rt:
        for step, path in teacher_ckpts:
            modes = ("ar", "static", "dynamic") if path == teacher_final else ("ar",)
            # as diffusion: the weights the student starts from, read the way the student reads them
            res = evaluate_checkpoint(rt.ctx, path, data.tokenizer, task, modes, cfg, as_student=False,
                                      shift_logits=convert.diffusion.shift_logits,
                                      block_grid=convert.diffusion.block_grid)
            curves["teacher_ar"].append((tokens["teacher"][step], res["ar"].accuracy))
            log(f"  teacher step {step}: AR accuracy {res['ar'].accuracy:.3f}")
            if path == teacher_final:
                final_teacher = res
        curves["student_static"].append((0.0, final_teacher["static"].accuracy))
        curves["student_dynamic"].append((0.0, final_teacher["dynamic"].accuracy))
        for step, path in checkpoints(os.path.join(cfg.out_dir, "student")):
            res = evaluate_checkpoint(rt.ctx, path, data.tokenizer, task, ("static", "dynamic"), cfg)
            curves["student_static"].append((tokens["student"][step], res["static"].accuracy))
            curves["student_dynamic"].append((tokens["student"][step], res["dynamic"].accuracy))
            log(f"  student step {step}: static {res['static'].accuracy:.3f}, dynamic {res['dynamic'].accuracy:.3f} "
                f"({res['dynamic'].tokens_per_round:.2f} tokens/round)")
            final_student = res
    return curves, final_teacher, final_student


def _report(cfg: DemoConfig, data: Any, convert: Any, curves: dict[str, list[tuple[float, float]]],
            final_teacher: dict[str, Any], final_student: dict[str, Any], tokens: dict[str, dict[int, float]],
            timings: dict[str, float], t0: float) -> dict[str, Any]:
    """The table, the plot and ``demo_results.json``; prints the summary."""
    from nemo_opdlm.config import to_dict
    from nemo_opdlm.eval.evaluate import format_table

    rows = [("teacher (AR)", final_teacher["ar"]),
            ("teacher as diffusion", final_teacher["static"]),
            ("teacher as diffusion", final_teacher["dynamic"]),
            ("OPDLM student", final_student["static"]),
            ("OPDLM student", final_student["dynamic"])]
    dynamic = final_student["dynamic"].settings
    plot_path = save_plot(os.path.join(cfg.out_dir, "demo.png"), curves, final_teacher["ar"].accuracy, data.family, block_size=dynamic["block_size"],
                        threshold=dynamic["threshold"])
    timings["total_s"] = time.perf_counter() - t0
    teacher_acc = max(final_teacher["ar"].accuracy, 1e-9)
    kept = {mode: final_student[mode].accuracy / teacher_acc for mode in ("static", "dynamic")}
    results = {
        "config": asdict(cfg),
        "task_family": data.family,
        "conversion": to_dict(convert),
        "kept_of_teacher": kept,
        "table": [{"model": label, **r.as_dict(with_samples=False)} for label, r in rows],
        "curves": {k: [{"tokens": x, "accuracy": y} for x, y in v] for k, v in curves.items()},
        "teacher_tokens": tokens["teacher"][max(tokens["teacher"])],
        "student_tokens": tokens["student"][max(tokens["student"])],
        "timings": timings,
        "plot": plot_path,
        "examples": [{k: s[k] for k in ("question", "generation", "gold", "correct")}
                     for s in final_student["dynamic"].samples[:3]],
    }
    with open(os.path.join(cfg.out_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n" + format_table(rows))
    print(f"\nteacher trained on {results['teacher_tokens']:.0f} response tokens; OPDLM conversion on "
          f"{results['student_tokens']:.0f} rollout tokens")
    print(f"the student keeps {kept['static']:.0%} of its teacher's accuracy under static decoding and "
          f"{kept['dynamic']:.0%} under threshold {dynamic['threshold']:g} "
          f"({final_student['dynamic'].tokens_per_round:.2f} tokens/round)")
    for ex in results["examples"]:
        print(f"  {ex['question']}{ex['generation']}   [{'ok' if ex['correct'] else 'wrong'}]")
    return results


def save_plot(path: str, curves: dict[str, list[tuple[float, float]]], teacher_acc: float,
              family: str, *, block_size: int, threshold: float) -> Optional[str]:
    """Accuracy against training tokens, teacher and student side by side; the PNG's path, or None
    without matplotlib."""
    from nemo_opdlm.eval.plot import Panel, Series, save_line_plot

    def series(label: str, key: str) -> Series:
        return Series(label, [x for x, _ in curves[key]], [y for _, y in curves[key]])

    panels = [
        Panel("AR teacher pre-training", "training tokens (responses)", "held-out accuracy",
              [series("teacher, AR decoding", "teacher_ar")]),
        Panel(f"OPDLM conversion (block {block_size})", "training tokens (own rollouts)", "held-out accuracy",
              [series("student, static 1 tok/round", "student_static"),
               series(f"student, dynamic thr {threshold:g}", "student_dynamic")],
              hlines=[("teacher (AR)", teacher_acc)]),
    ]
    return save_line_plot(path, panels, title=f"opdlm demo: synthetic {family} task, held-out accuracy")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opdlm demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="CI size: teacher 20 steps, student 5 steps")
    p.add_argument("--task", default="arithmetic", choices=sorted(S.FAMILIES),
                   help="synthetic task family: multi-step arithmetic, or sorting a word of letters")
    p.add_argument("--teacher-steps", type=int)
    p.add_argument("--student-steps", type=int)
    p.add_argument("--num-test", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first")
    return p.parse_args(argv)


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``opdlm demo``."""
    args = parse_args(argv)
    fields: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name in ("teacher_steps", "student_steps", "num_test"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    cfg = DemoConfig(out_dir=args.out, seed=args.seed, task=S.task_config(args.task), **fields)
    if os.path.exists(cfg.out_dir) and os.listdir(cfg.out_dir):
        if not args.overwrite:
            print(f"opdlm demo: {cfg.out_dir} is not empty; pass --overwrite or another --out", file=sys.stderr)
            return 2
        shutil.rmtree(cfg.out_dir)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        run_demo(cfg)
    except DemoStopped as stop:
        print(f"opdlm demo: {stop}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(demo_main())
