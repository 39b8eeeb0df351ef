"""Why a tiny teacher converts slowly: KL and agreement by block position and block state, per checkpoint.

One job: convert one teacher with several variants of the conversion settings (one seed each; the
seed spread is ``token_efficiency.py``'s job), and at every checkpoint measure where the student
still differs from its teacher, on two sources of block states:

- ``rollout``: the training rollouts' own states (threshold 0.9, T=1, on training prompts), as the
  loss sees them;
- ``static_eval``: the states greedy static decoding (1 token per round) visits on the held-out
  prompts, i.e. what the static evaluation asks of the student.

Per source and checkpoint: the mean forward KL(teacher || student) and the student/teacher top-1
agreement at the loss positions, each by position in the block and by the number of masked tokens
in the block; the share of loss tokens per masked count; the share of rollout tokens decoded in
each round of their block; the teacher's mean top-1 probability. Per checkpoint: its held-out
accuracy under greedy static and threshold decoding. Per variant: the KL and gradient norm of the
first training steps, what the student decodes at its first checkpoints, and (``--seeds``) the
accuracy curve of every training seed with the final accuracy's mean and range over them.

Variants (``--variants``): ``paper`` (the paper's unshifted student and all-threshold rollouts,
with the tiny recipe's learning rate), ``shift`` (+ ``diffusion.shift_logits``), ``recipe`` (the
tiny recipe: + ``rollout.static_fraction=0.25``).

    python benchmarks/conversion_diagnostics.py [--task arithmetic] [--steps 300] [--every 50] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.token_efficiency import _read_json, _write_json, commit, prepare_task  # noqa: E402

VARIANTS = {
    "paper": ["diffusion.shift_logits=false", "rollout.static_fraction=0"],
    "shift": ["diffusion.shift_logits=true", "rollout.static_fraction=0"],
    "recipe": [],
}


def _bucket(values, keys, n: int) -> list[Optional[float]]:
    """Mean of ``values [N]`` per key in ``0..n-1`` (None for an empty bucket)."""
    out = []
    for k in range(n):
        sel = keys == k
        out.append(round(float(values[sel].float().mean()), 4) if bool(sel.any()) else None)
    return out


def state_diagnostics(cfg, student, teacher, batch, eos, pad, *, seed: int, static_eval: bool) -> dict[str, Any]:
    """KL / agreement of ``student`` against ``teacher`` on the states of one batch of rollouts."""
    import dataclasses

    import torch

    from nemo_opdlm.distill import loss as L
    from nemo_opdlm.models.masks import logits_needed
    from nemo_opdlm.teacher.targets import shifted_targets, teacher_batch
    from nemo_opdlm.training import step as S

    if static_eval:  # greedy, 1 token per round: the states static evaluation visits
        cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, mode="static", temperature=0.0,
                                                                   static_fraction=0.0))
    length = cfg.rollout.max_length
    scfg = S.sampler_config(cfg, eos, pad, seed, max_new_tokens=length)
    resp = S.on_grid(cfg, S.get_responses(cfg, batch, student, teacher, scfg, length), pad)  # the states' frame
    rows = S.training_rows(cfg, resp, eos, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tb = teacher_batch(resp.prompt_ids, resp.prompt_lens, resp.tokens, resp.valid)
        width = resp.tokens.shape[1]
        t_logits = teacher[0](tb["input_ids"], tb["position_ids"], tb["meta"], logits_last=logits_needed(width))
        target = shifted_targets(t_logits, tb["input_ids"].shape[1] - width, width, None, None)
        for chunk in student:
            chunk.eval()
        s_logits = L.xt_logits(student[0](rows["input_ids"], rows["position_ids"], rows["meta"],
                                          **S.student_outputs(cfg, rows)), width)
    lm = rows["loss_mask"]  # [B, L]
    kl = L.token_kl(s_logits[lm], target.logprobs[lm], tp_group=None)  # [N] (one process: no TP)
    agree = (s_logits.argmax(-1) == target.logprobs.argmax(-1))[lm]  # [N]
    bs = cfg.diffusion.block_size
    batch_rows, width = lm.shape
    position = (torch.arange(width) % bs).expand(batch_rows, -1)[lm]  # [N]
    masked = rows["xt_masked"].view(batch_rows, -1, bs).sum(-1, keepdim=True).expand(-1, -1, bs)
    n_masked = masked.reshape(batch_rows, width)[lm] - 1  # [N] 0..bs-1: masked tokens in the block, minus one
    rounds = resp.step_map[resp.valid if resp.given is None else resp.valid & ~resp.given]
    return {
        "kl": round(float(kl.mean()), 4), "agree": round(float(agree.float().mean()), 4),
        "kl_by_position": _bucket(kl, position, bs), "agree_by_position": _bucket(agree, position, bs),
        "masked_in_block": list(range(1, bs + 1)),  # the index of the *_by_masked_in_block lists
        "kl_by_masked_in_block": _bucket(kl, n_masked, bs), "agree_by_masked_in_block": _bucket(agree, n_masked, bs),
        "loss_share_by_masked_in_block": [round(float((n_masked == k).float().mean()), 4) for k in range(bs)],
        "masked_fraction": round(float(rows["xt_masked"][resp.valid].float().mean()), 4),
        "round_share": [round(float((rounds == r).float().mean()), 4) for r in range(cfg.rollout.steps_per_block)],
        "tokens_per_round": round(resp.rollout_metrics.get("tokens_per_round", 0.0), 3),
        "teacher_top1_prob": round(float(target.logprobs[lm].max(-1).values.exp().mean()), 4),
    }


def diagnose_run(cfg, run_dir: str, teacher_info: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """Diagnostics of the teacher's weights (step 0) and every checkpoint of a run, with the
    held-out accuracy of each (greedy static and threshold decoding)."""
    import dataclasses

    from nemo_opdlm import demo as D
    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.data.prompts import load_prompts
    from nemo_opdlm.data.sampler import PromptLoader, ShardedSampler
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.models.teacher import freeze
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from nemo_opdlm.data.prompts import pad_id
    from nemo_opdlm.training.setup import eos_ids, load_tokenizer

    data = teacher_info["data"]
    out = []
    with runtime(ParallelLayout(), seed=1234) as rt:
        tok = load_tokenizer(cfg)
        eos, pad = eos_ids(tok), pad_id(tok)

        def batch_of(path: str):
            prompts = load_prompts(dataclasses.replace(cfg.data, path=path), tok, tok.eos_token_id)
            loader = PromptLoader(prompts, ShardedSampler(len(prompts), global_batch_size=min(rows, len(prompts)),
                                                          seed=7), pad)
            return loader.next_batch()

        train_batch, test_batch = batch_of(data["train"]), batch_of(data["test"])
        task = T.load_task(data["eval_format"], data["test"])
        teacher = freeze(load_model(rt.ctx, ckpt=teacher_info["checkpoint"], tokenizer=data["tokenizer"]).chunks)
        points = [(0, teacher_info["checkpoint"])] + D.checkpoints(run_dir)
        for step, path in points:
            student = load_model(rt.ctx, ckpt=path, tokenizer=data["tokenizer"],
                                 shift_logits=cfg.diffusion.shift_logits).chunks
            scores = D.evaluate_checkpoint(rt.ctx, path, data["tokenizer"], task, ("static", "dynamic"), D.DemoConfig(),
                                           shift_logits=cfg.diffusion.shift_logits,
                                           block_grid=cfg.diffusion.block_grid, as_student=step != 0)
            out.append({"step": step,
                        "accuracy": {m: scores[m].accuracy for m in ("static", "dynamic")},
                        "tokens_per_round": {m: scores[m].tokens_per_round for m in ("static", "dynamic")},
                        "rollout": state_diagnostics(cfg, student, teacher, train_batch, eos, pad, seed=11,
                                                     static_eval=False),
                        "static_eval": state_diagnostics(cfg, student, teacher, test_batch, eos, pad, seed=11,
                                                         static_eval=True)})
    return out


def accuracy_curve(cfg, run_dir: str, teacher_info: dict[str, Any]) -> list[dict[str, Any]]:
    """Held-out accuracy (greedy static and threshold) of the teacher's weights and every checkpoint."""
    from nemo_opdlm import demo as D
    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    data = teacher_info["data"]
    task = T.load_task(data["eval_format"], data["test"])
    out = []
    with runtime(ParallelLayout(), seed=1234) as rt:
        for step, path in [(0, teacher_info["checkpoint"])] + D.checkpoints(run_dir):
            res = D.evaluate_checkpoint(rt.ctx, path, data["tokenizer"], task, ("static", "dynamic"), D.DemoConfig(),
                                        shift_logits=cfg.diffusion.shift_logits,
                                        block_grid=cfg.diffusion.block_grid, as_student=step != 0)
            out.append({"step": step, "static": res["static"].accuracy, "dynamic": res["dynamic"].accuracy,
                        "tokens_per_round": res["dynamic"].tokens_per_round})
    return out


def decoded_examples(cfg, run_dir: str, teacher_info: dict[str, Any], steps: list[int]) -> dict[str, list[str]]:
    """Greedy static decodes of the first three held-out prompts at the given checkpoints."""
    from nemo_opdlm import demo as D
    from nemo_opdlm.eval import tasks as T
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    data = teacher_info["data"]
    task = T.load_task(data["eval_format"], data["test"], limit=3)
    ckpts = dict(D.checkpoints(run_dir))
    out = {}
    with runtime(ParallelLayout(), seed=1234) as rt:
        for step in steps:
            path = teacher_info["checkpoint"] if step == 0 else ckpts[step]
            res = D.evaluate_checkpoint(rt.ctx, path, data["tokenizer"], task, ("static",), D.DemoConfig(),
                                        shift_logits=cfg.diffusion.shift_logits,
                                        block_grid=cfg.diffusion.block_grid, as_student=step != 0)
            out[str(step)] = [s["question"] + s["generation"] for s in res["static"].samples]
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="/tmp/opdlm_token_efficiency", help="shared with token_efficiency.py")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--task", default="arithmetic", choices=("arithmetic", "sort"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="training seeds; the first gets the full diagnostics, every one its accuracy curve")
    p.add_argument("--rows", type=int, default=128, help="prompts per diagnostic batch")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    from nemo_opdlm import demo as D
    from nemo_opdlm.recipes import tiny
    from nemo_opdlm.config import RunConfig, apply_overrides, from_dict, to_dict
    from nemo_opdlm.runtime.seeding import demo_train_seed
    from nemo_opdlm.training.loop import train

    torch.set_num_threads(args.threads)
    log = D.Progress()
    t0 = time.perf_counter()
    bench_args = argparse.Namespace(work_dir=args.work_dir, quick=False, teacher_steps=None, num_test=None)
    teacher = prepare_task(bench_args, args.task, log)
    data = teacher["data"]
    result: dict[str, Any] = {"command": "python benchmarks/conversion_diagnostics.py " + " ".join(argv),
                              "commit": commit(), "threads": args.threads, "task": args.task,
                              "teacher": {k: teacher[k] for k in ("ar", "static", "dynamic")}, "variants": {}}
    def trained(name: str, seed: int):
        """The variant's config and history for ``seed`` (trained once; cached in its run directory)."""
        run_dir = os.path.join(args.work_dir, args.task, f"diagnostics_{name}_seed{seed}")
        base = tiny.conversion_config(teacher_checkpoint=teacher["checkpoint"], data_path=data["train"],
                                   tokenizer=data["tokenizer"], save_dir=run_dir, steps=args.steps,
                                   save_every=args.every, seed=demo_train_seed(seed))
        cfg = from_dict(RunConfig, apply_overrides(to_dict(base), list(VARIANTS[name])))
        history = _read_json(os.path.join(run_dir, "history.json"))
        if history is None or len(history) != args.steps:
            log(f"{name} seed {seed}: {args.steps} steps ({' '.join(VARIANTS[name]) or 'the tiny recipe'})")
            history = train(cfg)["history"]
            _write_json(os.path.join(run_dir, "history.json"), history)
        return cfg, run_dir, history

    for name in args.variants:
        cfg, run_dir, cached = trained(name, args.seeds[0])
        log(f"{name}: diagnostics at {len(D.checkpoints(run_dir)) + 1} checkpoints (seed {args.seeds[0]})")
        points = diagnose_run(cfg, run_dir, teacher, args.rows)
        curves = {args.seeds[0]: [{"step": p["step"], **p["accuracy"], "tokens_per_round": p["tokens_per_round"]["dynamic"]}
                                  for p in points]}
        for seed in args.seeds[1:]:
            cfg_s, dir_s, _ = trained(name, seed)
            curves[seed] = accuracy_curve(cfg_s, dir_s, teacher)
        finals = [c[-1] for c in curves.values()]
        result["variants"][name] = {
            "overrides": VARIANTS[name],
            "first_steps": [{k: h.get(k) for k in ("step", "kl", "grad_norm", "rollout/tokens_per_round")}
                            for h in cached[:10]],
            "grad_norm_by_50": [round(sum(h["grad_norm"] for h in cached[i:i + 50]) / len(cached[i:i + 50]), 3)
                                for i in range(0, len(cached), 50)],
            "points": points,
            "decoded": decoded_examples(cfg, run_dir, teacher, [0, args.every]),
            "accuracy_by_seed": curves,
            "final_over_seeds": {m: {"mean": sum(f[m] for f in finals) / len(finals), "min": min(f[m] for f in finals),
                                     "max": max(f[m] for f in finals)} for m in ("static", "dynamic")},
        }
        for pt in points:
            r, e = pt["rollout"], pt["static_eval"]
            log(f"  {name} step {pt['step']}: accuracy static {pt['accuracy']['static']:.2f} / threshold "
                f"{pt['accuracy']['dynamic']:.2f}; rollout KL {r['kl']:.3f} (by position {r['kl_by_position']}), "
                f"static-eval KL {e['kl']:.3f} (by masked-in-block {e['kl_by_masked_in_block']}), "
                f"round shares {r['round_share']}")
        fin = result["variants"][name]["final_over_seeds"]
        log(f"  {name}: final accuracy over seeds {args.seeds}: static {fin['static']}, threshold {fin['dynamic']}")
    result["wall_s"] = time.perf_counter() - t0
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "conversion_diagnostics.json")
    _write_json(path, result)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
