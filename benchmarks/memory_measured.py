"""``opdlm plan``'s memory model against the real step measured under fake tensors, per component.

One job: for Qwen3-0.6B and Qwen3-8B at TP=2 on one 8-GPU H100 node, at 512 and 4,000 response
tokens (1,024 prompt tokens), run ``nemo_opdlm.plan.measure.compare`` (one micro-batch of the
real step on rank 0: build, DDP + distributed optimizer, teacher targets, the student's forward
and backward, the optimizer update; FakeTensorMode + a fake process group + MemTracker) and write
the plan's GiB beside the measured ones, with the ratio. The target: the plan's peak within 15% of
the measured one for every case. About two minutes per case on this CPU::

    python benchmarks/memory_measured.py        # -> benchmarks/results/memory_measured.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = (
    ("qwen3_0_6b_self_tp1_pp1_8g", ("parallel.tp=2",)),
    ("qwen3_8b_self_tp2_pp1_8g", ()),
)
"""(recipe, overrides): the 0.6B recipe runs at TP=1 as shipped; the issue asks for TP=2 for both."""
LENGTHS = (512, 4000)
READING = (
    "- Weights, gradients, fp32 master weights and Adam moments: the plan counts them parameter by parameter; "
    "equal to the measurement.",
    "- Train phase: the plan counts every response position as a loss position (at most L per row); the measured "
    "row had the loss at the positions one sampled round masks again (2,765 of 4,004 at 4,000 tokens), so the "
    "KL's gathered fp32 copies are smaller than the plan's bound (0.93 at 0.6B, full-vocabulary KL; 0.98 at 8B, "
    "top-16).",
    "- Teacher phase: these recipes run the teacher inside the student's loss (route `in_loss`), so its forward "
    "happens in the train phase; the plan's teacher column bounds the routes that compute the targets before "
    "the pass. The peak is the train or the optimizer phase either way.",
    "- Optimizer phase: torch's AdamW (megatron-core without apex or Transformer Engine) with foreach kernels, as "
    "on a GPU: sqrt(v) of the rank's fp32 shard is one new tensor; at 8B and 512 tokens it is the peak.",
    "- Before this measurement existed, the full-vocabulary KL held about seven [N, V/tp] fp32 temporaries: "
    "12.35 GiB measured against the plan's 10.87 at 0.6B / 4,000 tokens (1.14); both were fixed (chunked "
    "`vocab_parallel.full_kl`, and the plan's logits and optimizer terms).",
    "- Not measured here: the rollout (its KV cache is the plan's closed form), PP > 1, FP8, and what is not a "
    "tensor (CUDA context, NCCL buffers, allocator fragmentation: the plan's 3 GiB overhead and 5% reserve). "
    "`benchmarks/gpu_check.sh` compares the plan with `torch.cuda.max_memory_allocated` on a GPU.",
)
TARGET = 0.15


def run_case(recipe: str, overrides: tuple[str, ...], length: int) -> dict:
    """One measurement in a process of its own (``--measure`` runs a fake process group)."""
    cmd = [sys.executable, "-m", "nemo_opdlm.plan", recipe, *overrides, f"rollout.max_length={length}",
           "--measure", "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: the plan refused (does not fit); still measured
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout)
    return {"recipe": recipe, "overrides": list(overrides), "response_tokens": length,
            "command": " ".join(["opdlm plan", recipe, *overrides, f"rollout.max_length={length}", "--measure"]),
            "seconds": round(time.perf_counter() - t0, 1), "row_tokens": data["measured"]["row_tokens"],
            "rows": data["measured"]["rows"]}


def markdown(result: dict) -> str:
    lines = [f"# opdlm plan vs the step measured under fake tensors (commit {result['commit'][:7]})", "",
             "GiB per GPU on rank 0, one micro-batch, the plan without its CUDA-context overhead; measured "
             "by `python benchmarks/memory_measured.py` on a CPU machine (no GPU), FlexAttention, FP8 off.", ""]
    for case in result["cases"]:
        lines += [f"## {case['command']} ({case['row_tokens']} tokens per row)", "",
                  "| component | plan | measured | measured / plan |", "|---|---|---|---|"]
        for name, row in case["rows"].items():
            plan = "-" if row["plan_gib"] is None else f"{row['plan_gib']:.2f}"
            ratio = "-" if row["measured_over_plan"] is None else f"{row['measured_over_plan']:.2f}"
            lines.append(f"| {name} | {plan} | {row['measured_gib']:.2f} | {ratio} |")
        lines.append("")
    lines += ["## Reading", "", *READING, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "memory_measured"),
                   help="path without extension: writes .json and .md")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    args = p.parse_args(argv)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "memory_measured", "commit": sha, "machine": platform.platform(),
              "target": f"plan peak within {TARGET:.0%} of the measured peak", "cases": []}
    for recipe, overrides in CASES:
        for length in map(int, args.lengths.split(",")):
            case = run_case(recipe, overrides, length)
            peak = case["rows"]["peak"]
            case["within_target"] = abs(1 - 1 / peak["measured_over_plan"]) <= TARGET
            print(f"{case['command']}: plan {peak['plan_gib']} GiB, measured {peak['measured_gib']} GiB "
                  f"({case['seconds']} s)", flush=True)
            result["cases"].append(case)
            with open(args.out + ".json", "w") as f:
                json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    return 0 if all(c["within_target"] for c in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
