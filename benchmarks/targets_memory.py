"""Peak memory of the teacher's targets and the student's KL, top-k and full vocabulary, the exact forms against the chunked ones.

One job: measure, with ``torch.profiler`` (``profile_memory=True``, the CPU memory timeline), the
peak that each step allocates beyond its inputs, at Qwen3's vocabulary (151,936 ids) and a
1,024-position row, in bf16 (the GPU recipes' dtype) and fp32:

- teacher targets, top-k: ``log_softmax`` of the whole ``[N, V]`` window then its top-k (before),
  against the top-k of the raw logits minus a log-normaliser computed a chunk of positions at a
  time (``vocab_parallel.topk_log_probs``, after);
- the student's top-k KL, forward and backward: the ``[N, V]`` fp32 log-softmax gathered at the ids
  (before), against ``vocab_parallel.topk_kl`` (the normaliser and the k gathered logits forward,
  a chunk at a time backward), after;
- full-vocabulary targets: ``log_softmax`` (before) against ``vocab_parallel.log_probs`` (the same
  fp32 output, written a chunk at a time after a chunked normaliser), after;
- the student's full-vocabulary KL: the log-softmax composition (before) against
  ``vocab_parallel.full_kl`` (terms and gradient a chunk at a time), after.

The inputs (the logits, and for the KL the gradient the step must return, ``[N, V]`` in the logits'
dtype) are the same in both forms and are not counted. Writes one JSON::

    python benchmarks/targets_memory.py --out benchmarks/results/targets_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nemo_opdlm.runtime import vocab_parallel as VP  # noqa: E402

MIB = 2**20


def peak_mib(fn) -> float:
    """The highest total of live CPU allocations while ``fn()`` runs, in MiB (profiler memory timeline)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    return max(sum(s) for s in sizes) / MIB


def _old_targets(logits, k):
    return VP.topk(VP.log_softmax(logits, None), k, None)


def _new_targets(logits, k):
    return VP.topk_log_probs(logits, k, None)


def _old_kl(student, logp_t, ids):
    logp_s = VP.gather_global(VP.log_softmax(student, None), ids, None)
    return _terms(logp_t, logp_s)


def _new_kl(student, logp_t, ids):
    return VP.topk_kl(student, logp_t, ids, None)


def _old_full_kl(student, logp_t, ids=None):
    return _terms(logp_t, VP.log_softmax(student, None))


def _new_full_kl(student, logp_t, ids=None):
    return VP.full_kl(student, logp_t, None)


def _terms(logp_t, logp_s):
    p_t = logp_t.exp()
    return torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t)).sum(-1)


FORMS = {
    "topk": {"targets": (_old_targets, _new_targets), "kl": (_old_kl, _new_kl)},
    "full": {"targets": (lambda x, k: VP.log_softmax(x, None), lambda x, k: VP.log_probs(x, None)),
             "kl": (_old_full_kl, _new_full_kl)},
}
"""Per kind of target: (today's form, the chunked one) of the teacher's targets and of the KL."""


def measure(vocab: int, positions: int, k: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(positions, vocab, generator=g).to(dtype)
    inputs = logits.numel() * logits.element_size() / MIB
    out: dict = {"dtype": str(dtype).split(".")[-1], "input_logits_mib": round(inputs, 1)}
    for kind, forms in FORMS.items():
        for name, fn in zip(("before", "after"), forms["targets"]):
            out[f"{kind}_targets_{name}_mib"] = round(peak_mib(lambda: fn(logits, k)) - inputs, 1)
        logp_t, ids = VP.topk_log_probs(logits, k, None) if kind == "topk" else (VP.log_probs(logits, None), None)
        for name, fn in zip(("before", "after"), forms["kl"]):
            def step():
                student = logits.detach().clone().requires_grad_(True)
                fn(student, logp_t, ids).sum().backward()
                return student.grad
            # the logits, the student's copy of them and its gradient exist either way: count what the KL adds
            out[f"{kind}_kl_fwd_bwd_{name}_mib"] = round(peak_mib(step) - 3 * inputs, 1)
        for what in ("targets", "kl_fwd_bwd"):
            out[f"{kind}_{what}_after_over_before"] = round(
                out[f"{kind}_{what}_after_mib"] / out[f"{kind}_{what}_before_mib"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--positions", type=int, default=1024, help="positions of one micro-batch (rows x L)")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "command": "python benchmarks/targets_memory.py " + " ".join(argv or sys.argv[1:]),
        "commit": sha, "machine": platform.platform(), "torch": torch.__version__,
        "chunk_rows": VP.CHUNK_ROWS, "vocab": args.vocab, "positions": args.positions, "top_k": args.top_k,
        "cases": [measure(args.vocab, args.positions, args.top_k, dt) for dt in (torch.bfloat16, torch.float32)],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
