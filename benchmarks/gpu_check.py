"""This project's GPU figures from one command on one GPU, in one JSON (``benchmarks/gpu_check.sh``).

Sections, each in its own process (a crash or an out-of-memory in one keeps the others), in the
order of what a first GPU run most needs to know, within a time budget (default 8 minutes):

- ``tests``: the GPU-marked tests (``pytest -m gpu tests/gpu``): compiled FlexAttention forward and
  backward, its recompiles across the curriculum, the trainer on CUDA against the CPU's losses;
- ``memory``: ``opdlm plan``'s per-phase memory against ``torch.cuda.max_memory_allocated`` of each
  phase of real training steps: the Qwen3-0.6B recipe (random weights at the real shape, Qwen3's
  151,936-row vocabulary) on this one GPU at a short curriculum length;
- ``bench``: ``gpu_bench.py`` at the Qwen3-0.6B shape: the student's step against Hugging Face
  forward+backward, the rollouts (threshold 0.9 and static, batch 128) against Hugging Face
  ``generate``;
- ``fp8``: the ``memory`` run with Transformer Engine's FP8 GEMMs, where Transformer Engine imports
  (otherwise recorded as skipped, with the reason).

``--dry-run`` runs every section at a tiny shape on the CPU (what CI runs): the same code, with the
GPU-only numbers (CUDA peaks, the GPU tests) recorded as absent. The JSON is rewritten after every
section, so a run cut short keeps what it measured::

    bash benchmarks/gpu_check.sh                     # -> benchmarks/results/gpu_check_<gpu>.json
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

SECTIONS = ("tests", "memory", "bench", "fp8")
MIN_SECONDS = {"tests": 60, "memory": 60, "bench": 90, "fp8": 60}
"""Below this much budget left a section is skipped (recorded as such) rather than cut short."""
RECIPE = "qwen3_0_6b_self_tp1_pp1_8g"
BENCH_ARGS = ("--shapes", "qwen3-0.6b", "--rollout-tokens", "256", "--step-tokens", "256", "--iters", "3",
              "--sections", "hf_train,hf_generate,student_step,teacher,rollout,opdlm_step")
"""gpu_bench.py at the 0.6B shape, shortened to fit the budget: 256 new tokens per rollout (batch 128)."""


@dataclass(frozen=True)
class MemoryRun:
    """The ``memory`` section's run: the recipe on one GPU, one data-parallel rank's share of a step."""

    prompts: int = 16
    """Prompts per step: the recipe's 128 over its 8 GPUs."""
    prompt_tokens: int = 128
    response_tokens: int = 512
    """The curriculum length of both steps (a short one: the recipe grows to 4,000)."""
    steps: int = 2
    """The last step is compared (the first also compiles)."""
    model: tuple[str, ...] = ()
    """Overrides of the recipe's model (the dry run's tiny shape)."""


MEASURED_PHASE = {"rollout": "rollout", "teacher": "teacher", "train": "student_fwd_bwd", "optimizer": "optimizer"}
"""``opdlm plan``'s phases -> the trainer's (``training.step.forward_backward``; its ``memory/*`` logs)."""

GPU_RUN = MemoryRun()
DRY_RUN = MemoryRun(prompts=2, prompt_tokens=8, response_tokens=8,
                    model=("model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
                           "model.num_attention_heads=4", "model.num_query_groups=2", "model.head_dim=16"))


# --- sections ---------------------------------------------------------------------------------


def run_tests(args: argparse.Namespace, work: str, timeout: float) -> dict[str, Any]:
    """``pytest -m gpu tests/gpu``: counts from its JUnit XML and the failures' first lines."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"ok": False, "error": "pytest does not import here: carry its wheels in .whl/ (pytest pluggy "
                                      "iniconfig pytest-timeout; README, GPU figures)"}
    xml = os.path.join(work, "gpu_tests.xml")
    proc = _run([sys.executable, "-m", "pytest", "-m", "gpu", os.path.join(ROOT, "tests", "gpu"), "-q", "-rs",
                 "-p", "no:cacheprovider", f"--junitxml={xml}"], timeout)
    out: dict[str, Any] = {"returncode": proc["returncode"], "tail": proc["tail"]}
    if os.path.exists(xml):
        out.update(junit_counts(xml))
    # on a GPU a skipped GPU test is a failure of the check (a CPU dry run skips them all, saying so)
    out["ok"] = proc["returncode"] == 0 and (args.dry_run or out.get("skipped_tests", 1) == 0)
    return out


def junit_counts(path: str) -> dict[str, Any]:
    """Tests, failures (+ errors), skips and each failure's test id and message from a JUnit XML file."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                               "message": (node.get("message") or "")[:500]})
    n = int(suite.get("tests", 0))
    skipped = int(suite.get("skipped", 0))
    return {"tests": n, "passed": n - len(failed) - skipped, "failed": failed, "skipped_tests": skipped}


def run_memory(args: argparse.Namespace, work: str, timeout: float, fp8: bool = False) -> dict[str, Any]:
    """The memory run in a child process (a fresh CUDA context and allocator)."""
    part = os.path.join(work, "memory_fp8.json" if fp8 else "memory.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "memory", "--work", work, "--out", part]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--fp8"] if fp8 else []
    proc = _run(cmd, timeout)
    out = json.load(open(part)) if os.path.exists(part) else {}
    out.update(returncode=proc["returncode"], ok=proc["returncode"] == 0 and "phases" in out)
    if not out["ok"]:
        out["tail"] = proc["tail"]
    return out


def run_fp8(args: argparse.Namespace, work: str, timeout: float) -> dict[str, Any]:
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install's own error)
        return {"skipped": f"transformer_engine does not import ({type(exc).__name__}: {exc})"[:300], "ok": True}
    return run_memory(args, work, timeout, fp8=True)


def run_bench(args: argparse.Namespace, work: str, timeout: float) -> dict[str, Any]:
    """gpu_bench.py (``--tiny`` in the dry run); its whole JSON, with the ratios lifted to the top."""
    part = os.path.join(work, "gpu_bench.json")
    bench_args = ["--tiny", "--sections", "hf_train,hf_generate,student_step,rollout"] if args.dry_run else BENCH_ARGS
    proc = _run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), *bench_args, "--out", part],
                timeout)
    out: dict[str, Any] = {"returncode": proc["returncode"], "ok": proc["returncode"] == 0}
    if os.path.exists(part):
        data = json.load(open(part))
        out["ratios"] = {shape: v.get("ratios", {}) for shape, v in data.get("shapes", {}).items()}
        out["gpu_bench"] = data
    if not out["ok"]:
        out["tail"] = proc["tail"]
    return out


RUNNERS: dict[str, Callable[[argparse.Namespace, str, float], dict[str, Any]]] = {
    "tests": run_tests, "memory": run_memory, "bench": run_bench, "fp8": run_fp8}


def _run(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd``, its output streamed through (progress on long sections), the tail kept."""
    print("+ " + " ".join(cmd), flush=True)
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines = (lines + [line])[-60:]
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        lines.append(f"[gpu_check] killed after {timeout:.0f} s (the time budget)\n")
        code = -9
    return {"returncode": code, "tail": "".join(lines)[-4000:]}


# --- the memory run (child process) -------------------------------------------------------------


def memory_config(work: str, run: MemoryRun, fp8: bool):
    """The recipe on one GPU at ``run``'s size, pointing at a random checkpoint and prompts in ``work``."""
    from nemo_opdlm.recipes.lookup import resolve

    overrides = [f"init.teacher_hf={os.path.join(work, 'hf')}", f"data.path={os.path.join(work, 'prompts.jsonl')}",
                 "data.chat_template=never", f"data.max_prompt_tokens={run.prompt_tokens}",
                 f"rollout.min_length={run.response_tokens}", f"rollout.max_length={run.response_tokens}",
                 f"train.prompts_per_step={run.prompts}", f"train.steps={run.steps}", "optim.warmup_steps=0", "train.save_dir=null",
                 *run.model]
    if fp8:
        overrides += ["model.linear_impl=te", "model.fp8=hybrid"]
    return resolve(RECIPE, overrides)


def write_inputs(work: str, cfg, run: MemoryRun) -> None:
    """A seeded random Hugging Face checkpoint of the recipe's architecture (on the GPU when there is
    one: seconds, not minutes), a word tokenizer whose ids stop below the [MASK] row, and prompts of
    ``prompt_tokens`` words."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nemo_opdlm.convert.hf_config import hf_config_from_model
    from serve_check import save_tokenizer

    hf = os.path.join(work, "hf")
    fields = hf_config_from_model(cfg.model)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=cfg.model.dtype)
    model.save_pretrained(hf)
    del model
    save_tokenizer(hf, size=cfg.diffusion.mask_token_id)
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for i in range(run.prompts * run.steps):
            f.write(json.dumps({"prompt": " ".join(f"w{10 + (i * 7 + j) % 1000}" for j in range(run.prompt_tokens))})
                    + "\n")


def plan_phases(cfg) -> tuple[dict[str, float], dict[str, Any]]:
    """``opdlm plan``'s estimate for ``cfg`` on this one device: per phase, the GiB the allocator
    holds (the plan's total less its CUDA-context overhead, which ``max_memory_allocated`` never
    sees), and every component in GiB."""
    from nemo_opdlm.plan.layout import GIB, Cluster, check_layout
    from nemo_opdlm.plan.memory import estimate_memory

    cluster = Cluster(1, 1, plan_gpu())
    model = cfg.model.replace(fp8=cfg.model.resolved_fp8())  # what this machine builds
    cfg = dataclasses.replace(cfg, model=model, teacher_model=None if cfg.teacher_model is None else
                              cfg.teacher_model.replace(fp8=cfg.teacher_model.resolved_fp8()))
    shape, _ = check_layout(cfg, cluster)
    est = estimate_memory(cfg, shape, cluster)
    overhead = cluster.spec.overhead_gib * GIB
    phases = {p: (est.phase_total(p) - overhead) / GIB for p in est.phases}
    components = {"static": {k: v / GIB for k, v in est.static.items()},
                  **{p: {k: v / GIB for k, v in c.items()} for p, c in est.phases.items()}}
    return phases, {"gpu_kind": cluster.gpu, "shape": dataclasses.asdict(shape), "components_gib": components}


def plan_gpu() -> str:
    """The ``opdlm plan`` GPU kind of this device ('cpu' without one)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    if "H200" in name:
        return "h200"
    if "A100" in name:
        return "a100-80g" if torch.cuda.get_device_properties(0).total_memory > 50 * 2**30 else "a100-40g"
    return "h100-80g"


def memory_child(work: str, dry_run: bool, fp8: bool, out: str) -> None:
    """Train ``steps`` steps of the recipe and compare each phase's measured peak with the plan's."""
    from nemo_opdlm.training.loop import train

    run = DRY_RUN if dry_run else GPU_RUN
    cfg = memory_config(work, run, fp8)
    t0 = time.perf_counter()
    write_inputs(work, cfg, run)
    planned, plan = plan_phases(cfg)
    report: dict[str, Any] = {"recipe": RECIPE, "run": dataclasses.asdict(run), "fp8": fp8, "plan": plan,
                              "inputs_s": round(time.perf_counter() - t0, 1)}
    _write(out, report)
    history = train(cfg)["history"]
    last = history[-1]
    report["step_s"] = [round(h["time/step_s"], 2) for h in history]
    report["loss"] = [h.get("loss") for h in history]
    report["phases"] = {}
    for phase, gib in planned.items():
        measured = last.get(f"memory/{MEASURED_PHASE[phase]}_peak_gib")
        report["phases"][phase] = {"plan_gib": round(gib, 3),
                                   "measured_gib": None if measured is None else round(measured, 3),
                                   "measured_over_plan": None if measured is None else round(measured / gib, 3)}
    plan_peak = max(planned.values())
    measured_peak = max((v for k, v in last.items() if k.startswith("memory/")), default=None)
    report["peak"] = {"plan_gib": round(plan_peak, 3), "measured_gib": measured_peak,
                      "measured_over_plan": None if measured_peak is None else round(measured_peak / plan_peak, 3)}
    _write(out, report)


# --- driver -------------------------------------------------------------------------------------


def _write(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per section for the console."""
    lines = []
    for name, sec in report["sections"].items():
        if "skipped" in sec:
            lines.append(f"{name}: skipped ({sec['skipped']})")
        elif name == "tests":
            lines.append(f"tests: {sec.get('passed', 0)} passed, {len(sec.get('failed', []))} failed, "
                         f"{sec.get('skipped_tests', 0)} skipped")
        elif name in ("memory", "fp8") and "phases" in sec:
            cells = [f"{p} plan {v.get('plan_gib', '-')} / measured {v['measured_gib']} GiB"
                     for p, v in sec["phases"].items()]
            lines.append(f"{name}: " + "; ".join(cells))
        elif name == "bench":
            lines.append(f"bench: {json.dumps(sec.get('ratios', {}))}")
        if not sec.get("ok", True):
            lines.append(f"{name}: FAILED (returncode {sec.get('returncode')}); see its 'tail' in the JSON")
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every section at a tiny shape on the CPU (CI)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_check_<device>.json)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for all sections")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--child", choices=["memory"], help=argparse.SUPPRESS)
    parser.add_argument("--fp8", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child == "memory":
        memory_child(args.work, args.dry_run, args.fp8, args.out)
        return 0
    from gpu_bench import gpu_name, versions

    wanted = args.sections.split(",")
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    device = gpu_name()
    tag = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_").lower()
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"gpu_check_{tag}.json")
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    report: dict[str, Any] = {"benchmark": "gpu_check", "device": device, "dry_run": args.dry_run,
                              "versions": versions(), "budget_s": args.budget_s,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}
    print(f"gpu_check on {device}; writing {out}", flush=True)
    deadline = time.monotonic() + args.budget_s
    for name in wanted:
        left = deadline - time.monotonic()
        if left < MIN_SECONDS[name]:
            report["sections"][name] = {"skipped": f"time budget: {left:.0f} s left of {args.budget_s:.0f}"}
        else:
            t0 = time.monotonic()
            report["sections"][name] = RUNNERS[name](args, work, left)
            report["sections"][name]["seconds"] = round(time.monotonic() - t0, 1)
        _write(out, report)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    _write(out, report)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    for line in summary_lines(report):
        print(line, flush=True)
    failed = [n for n, s in report["sections"].items() if not s.get("ok", True)]
    if failed:
        print(f"failed sections: {failed} (the others are in {out})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
