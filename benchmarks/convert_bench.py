"""Import / export time and peak memory of the HF <-> Megatron converter on CPU.

Builds a random Qwen3-architecture model (>= 100M parameters by default) with ``transformers``,
saves it as sharded safetensors, then times, each in a fresh process so that peaks do not mix:

- ``import``: HF directory -> megatron-core torch_dist checkpoint (``convert.hf_to_mcore.import_hf``);
- ``direct``: HF directory -> teacher chunks in memory, no checkpoint (``teacher_from_hf``);
- ``export``: torch_dist checkpoint -> HF directory (``convert.mcore_to_hf.export_checkpoint``);
- ``verify``: every exported tensor is bit-identical to the original.

Memory: ``peak_rss`` is the step process's own high-water mark (``ru_maxrss``; includes the
interpreter, torch, megatron-core and transformers: ``baseline_rss`` is that part, measured after
the imports); ``peak_tree_pss`` is the sampled peak of the proportional set size summed over the
step process and its children (dist_checkpointing forks writer processes; PSS does not count
their shared pages twice). The target is ``peak_rss < 2.5 x checkpoint size``.

    OMP_NUM_THREADS=1 python benchmarks/convert_bench.py --out benchmarks/results/convert_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Steps (each runs in its own process and prints one JSON line).
# ---------------------------------------------------------------------------------------------


def step_make(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.groups,
                      head_dim=args.head_dim, tie_word_embeddings=bool(args.tied), max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.hf_dir, max_shard_size=args.shard)
    return {"parameters": n_params}


def _conversion(fn) -> dict[str, Any]:
    baseline = rss_bytes()
    start = time.perf_counter()
    fn()
    return {"seconds": time.perf_counter() - start, "baseline_rss": baseline, "peak_rss": max_rss_bytes()}


def step_import(args: argparse.Namespace) -> dict[str, Any]:
    from nemo_opdlm.convert.hf_to_mcore import import_hf
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    with runtime(ParallelLayout()) as rt:
        return _conversion(lambda: import_hf(args.hf_dir, args.ckpt_dir, rt.ctx))


def step_direct(args: argparse.Namespace) -> dict[str, Any]:
    from nemo_opdlm.convert.hf_to_mcore import teacher_from_hf
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    with runtime(ParallelLayout()) as rt:
        return _conversion(lambda: teacher_from_hf(args.hf_dir, rt.ctx))


def step_export(args: argparse.Namespace) -> dict[str, Any]:
    from nemo_opdlm.convert.mcore_to_hf import export_checkpoint
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    with runtime(ParallelLayout()) as rt:
        return _conversion(lambda: export_checkpoint(args.ckpt_dir, args.out_dir, rt.ctx,
                                                     max_shard_bytes=args.shard_bytes))


def step_verify(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors import safe_open

    def index(directory: str) -> dict[str, str]:
        return {name: os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")
                for name in safe_open(os.path.join(directory, f), "pt").keys()}

    a, b = index(args.hf_dir), index(args.out_dir)
    same = sorted(a) == sorted(b)
    for name in a if same else []:
        ta = safe_open(a[name], "pt").get_tensor(name)
        tb = safe_open(b[name], "pt").get_tensor(name)
        same = same and ta.dtype == tb.dtype and torch.equal(ta.view(torch.uint8), tb.view(torch.uint8))
    return {"bit_identical": same, "tensors": len(a)}


STEPS = {"make": step_make, "import": step_import, "direct": step_direct, "export": step_export, "verify": step_verify}


# ---------------------------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------------------------


def _tree_pss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_step(name: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--step", name, *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_pss(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"step {name} failed:\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_tree_pss"] = peak[0]
    return result


def dir_bytes(directory: str, suffix: str = "") -> int:
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(suffix))
    return total


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--step", choices=sorted(STEPS), default=None, help=argparse.SUPPRESS)
    # Default shape: Qwen3-0.6B (596M parameters, tied embeddings), the paper's smallest student.
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--tied", type=int, choices=(0, 1), default=1)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--shard", default="300MB", help="HF max_shard_size of the source checkpoint")
    p.add_argument("--shard-bytes", type=int, default=300 * 10**6, help="exporter's max shard bytes")
    p.add_argument("--workdir", default=None, help="where to put the checkpoints (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.step is not None:
        print(json.dumps(STEPS[args.step](args)))
        return 0
    work = args.workdir or tempfile.mkdtemp(prefix="convert_bench-")
    dirs = {k: os.path.join(work, k) for k in ("hf", "ckpt", "out")}
    for d in ("ckpt", "out"):
        shutil.rmtree(dirs[d], ignore_errors=True)
    shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--heads",
             str(args.heads), "--groups", str(args.groups), "--head-dim", str(args.head_dim), "--vocab",
             str(args.vocab), "--tied", str(args.tied), "--dtype", args.dtype,
             "--shard", args.shard, "--shard-bytes", str(args.shard_bytes)]
    paths = ["--hf-dir", dirs["hf"], "--ckpt-dir", dirs["ckpt"], "--out-dir", dirs["out"]]
    shutil.rmtree(dirs["hf"], ignore_errors=True)
    made = run_step("make", shape + paths)
    ckpt_bytes = dir_bytes(dirs["hf"], ".safetensors")
    report: dict[str, Any] = {
        "model": {"architecture": "Qwen3ForCausalLM", "parameters": made["parameters"], "dtype": args.dtype,
                  "layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "heads": args.heads,
                  "groups": args.groups, "head_dim": args.head_dim, "vocab": args.vocab, "tied": bool(args.tied)},
        "checkpoint_bytes": ckpt_bytes,
        "hf_shards": len([f for f in os.listdir(dirs["hf"]) if f.endswith(".safetensors")]),
        "machine": {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "python": platform.python_version()},
        "limit_peak_rss_over_checkpoint": 2.5,
    }
    for name in ("import", "direct", "export"):
        r = run_step(name, shape + paths)
        r["peak_rss_over_checkpoint"] = r["peak_rss"] / ckpt_bytes
        r["peak_above_baseline_over_checkpoint"] = (r["peak_rss"] - r["baseline_rss"]) / ckpt_bytes
        r["peak_tree_pss_over_checkpoint"] = r["peak_tree_pss"] / ckpt_bytes
        r["within_limit"] = r["peak_rss"] < 2.5 * ckpt_bytes
        report[name] = r
    report["megatron_checkpoint_bytes"] = dir_bytes(dirs["ckpt"])
    report["verify"] = run_step("verify", shape + paths)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
