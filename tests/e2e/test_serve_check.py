"""benchmarks/serve_check.py's dry run (what CI and a machine without the engines run): the SDAR export
and the project's side, the commands it would run, and the agreement arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import serve_check  # noqa: E402

TINY = ["--hidden", "64", "--layers", "2", "--head-dim", "16", "--ffn", "96", "--prompts", "4", "--max-new-tokens", "8"]


def test_dry_run_exports_decodes_and_prints_the_commands(tmp_path):
    out, work = tmp_path / "serve.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "serve_check.py"), "--dry-run", *TINY,
                           "--out", str(out), "--work", str(work)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"] and report["dry_run"] and report["device"].startswith("CPU")
    assert "untrained" in report["student"]["weights"] and report["student"]["vocab_size"] == 151936
    config = json.load(open(os.path.join(report["export"], "config.json")))
    assert config["architectures"] == ["SDARForCausalLM"] and config["block_grid"] == "absolute"
    assert sorted(len_ % 4 for len_ in report["prompt_lens"]) == [0, 1, 2, 3]  # every head length
    for name in ("static", "t0.9"):
        side = report["project"][name]
        assert side["tokens_per_s"] > 0 and len(side["tokens"]) == 4 and len(side["tokens"][0]) == 8
    assert report["project"]["static"]["tokens_per_round"] == 1.0
    assert report["engines"] == {"sglang": {"ran": False, "skipped": "--dry-run"},
                                 "lmdeploy": {"ran": False, "skipped": "--dry-run"}}
    sglang = report["commands"]["sglang"]["t0.9"]
    assert sglang["yaml"] == "block_size: 4\nthreshold: 0.9\n"
    assert "-m sglang.launch_server --model-path" in sglang["launch"]
    assert ("--trust-remote-code --dllm-algorithm LowConfidence --dllm-algorithm-config sglang_t0.9.yaml"
            in sglang["launch"])
    assert "dllm_unmasking_strategy='low_confidence_static'" in report["commands"]["lmdeploy"]["static"]
    assert "sglang not run (--dry-run); it would run:" in proc.stdout and "lmdeploy not run" in proc.stdout


def test_agreement_counts_positions_of_the_reference():
    got = serve_check.agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6]])
    assert got == {"per_token": 0.625, "tokens_compared": 8, "rows_identical": 0, "rows": 2,
                   "first_divergence": [2, 2]}
    assert serve_check.agreement([[1, 2]], [[1, 2, 3]])["rows_identical"] == 1  # longer engine output: ours counts
