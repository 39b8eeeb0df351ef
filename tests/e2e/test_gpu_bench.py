"""benchmarks/gpu_bench.py end to end at its tiny CPU size, and the arithmetic its ratios rest on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_bench  # noqa: E402

SECTIONS = ("hf_train", "hf_generate", "student_step", "teacher", "rollout_t0.9", "rollout_static", "opdlm_step")


def run_bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--tiny", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    proc = run_bench(tmp, "--out", str(out), "--sections", ",".join(gpu_bench.SECTIONS))  # paired_train too
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_section_measured(report):
    data, stdout = report
    tiny = data["shapes"]["tiny"]
    for section in SECTIONS:
        assert tiny[section]["tokens_per_s" if section != "opdlm_step" else "step_s"] > 0, section
        assert tiny[section]["graphs_compiled_after_warmup"] == 0, section
        assert "peak_gib" in tiny[section], section
    assert data["device"].startswith("CPU") and data["finished"]
    assert data["versions"]["megatron.core"] != "absent"
    assert set(data["targets"]) <= set(tiny["ratios"])
    assert "target >= 3.0" in stdout and "rollout_t0.9_vs_hf_generate" in stdout
    paired = tiny["paired_train"]
    assert paired["pairs"] == data["settings"]["iters"]
    assert paired["step_ratio_min"] <= paired["step_ratio_median"] <= paired["step_ratio_max"]
    assert tiny["ratios"]["paired_student_step_vs_hf_fwd_bwd"] == round(paired["step_ratio_median"], 3)


def test_sizes_follow_the_settings(report):
    data, _ = report
    s, tiny = data["settings"], data["shapes"]["tiny"]
    assert tiny["hf_train"]["tokens"] == s["train_batch"] * s["train_seq"]
    assert tiny["student_step"]["tokens"] == s["train_batch"] * s["train_seq"]
    assert tiny["teacher"]["tokens"] == s["train_batch"] * (s["train_prompt"] + (s["train_seq"] - s["train_prompt"]) // 2)
    assert tiny["hf_generate"]["tokens"] == s["rollout_batch"] * s["rollout_tokens"]
    for section in ("rollout_t0.9", "rollout_static"):
        assert tiny[section]["tokens"] == s["rollout_batch"] * s["rollout_tokens"]  # no EOS: full length
    assert tiny["rollout_static"]["tokens_per_round"] == 1.0
    assert tiny["rollout_t0.9"]["tokens_per_round"] > 1.0  # the calibration made the threshold fire
    assert 1.0 < tiny["calibration"]["probe_tokens_per_round"] <= s["block_size"]


def test_step_breakdown_adds_up(report):
    step = report[0]["shapes"]["tiny"]["opdlm_step"]
    phases = ("rollout_s", "teacher_s", "student_fwd_bwd_s", "optimizer_s")
    assert all(step[p] > 0 for p in phases)
    assert abs(sum(step[p] for p in phases) - step["step_s"]) < 1e-3
    assert abs(sum(step["share"].values()) - 1.0) < 0.01
    s = report[0]["settings"]
    assert step["rollout_tokens"] == s["step_prompts"] * s["step_tokens"]


@pytest.mark.slow
def test_sections_subset_and_bad_names(tmp_path):
    out = tmp_path / "one.json"
    proc = run_bench(tmp_path, "--sections", "teacher", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(out.read_text())["shapes"]["tiny"]) == {"teacher", "ratios"}
    proc = run_bench(tmp_path, "--sections", "teacher,rollouts")
    assert proc.returncode != 0 and "unknown shape/section ['rollouts']" in proc.stderr


def test_flop_count_matches_hf_weights():
    """The FLOP model's weights are exactly the 2-D weights of the Hugging Face model of the shape."""
    for cfg in (gpu_bench.tiny_shape(), gpu_bench.tiny_shape().replace(tie_word_embeddings=False)):
        hf = gpu_bench.hf_model(cfg)
        weights = [p for name, p in hf.named_parameters() if p.dim() == 2 and "embed_tokens" not in name]
        if cfg.tie_word_embeddings:  # the output layer is the embedding: counted once, as a matmul
            weights.append(hf.get_input_embeddings().weight)
        assert gpu_bench.matmul_params(cfg) == sum(p.numel() for p in weights)


def test_causal_attention_pairs():
    from tests.tiny import sequence_layout

    layout = sequence_layout(2, 10, block_size=1)
    assert gpu_bench.attended_pairs(layout.meta) == 2 * 10 * 11 // 2
    block = sequence_layout(1, 8, block_size=4)  # blocks see themselves whole
    assert gpu_bench.attended_pairs(block.meta) == 4 * 4 + 4 * 8


def test_settings_validation():
    with pytest.raises(ValueError, match="multiple of"):
        gpu_bench.Settings(train_seq=2047)
    with pytest.raises(ValueError, match="step_micro_batch"):
        gpu_bench.Settings(step_prompts=30, step_micro_batch=4)


def test_a_failing_section_is_recorded_and_the_rest_kept(tmp_path):
    """An out-of-memory or compile error in one section must not lose the others (a GPU session
    has minutes): the error goes into the JSON, the run goes on, and the exit code says so."""
    report = gpu_bench.Report(str(tmp_path / "r.json"), {"benchmark": "test"})
    gpu_bench.measure(report, "tiny", "teacher", lambda: {"tokens_per_s": 5.0})

    def out_of_memory():
        raise RuntimeError("CUDA out of memory (simulated)")

    gpu_bench.measure(report, "tiny", "hf_train", out_of_memory)
    gpu_bench.measure_part(report, "tiny", "our_models", out_of_memory)
    written = json.loads((tmp_path / "r.json").read_text())["shapes"]["tiny"]
    assert written["teacher"]["tokens_per_s"] == 5.0
    assert written["hf_train"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "simulated" in written["our_models_error"]
    assert report.failed == ["tiny/hf_train", "tiny/our_models"]
