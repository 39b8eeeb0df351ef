"""benchmarks/gpu_check.sh --dry-run: the GPU check's CPU half, end to end through the shell script
(every section in its child process, one JSON), and the JUnit reading its tests section rests on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check")
    out = tmp / "check.json"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--work", str(tmp / "work")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_section_ran_on_the_cpu(report):
    data, stdout = report
    sections = data["sections"]
    assert list(sections) == list(gpu_check.SECTIONS) and data["dry_run"] and data["finished"]
    assert all(s["ok"] for s in sections.values()), sections
    tests = sections["tests"]
    assert tests["tests"] == tests["skipped_tests"] >= 8 and tests["failed"] == []  # no CUDA: skipped, saying so
    assert "needs a CUDA device" in tests["tail"]
    assert set(sections["bench"]["ratios"]["tiny"]) >= {"student_step_vs_hf_fwd_bwd", "rollout_t0.9_vs_hf_generate"}
    assert "tests: 0 passed, 0 failed" in stdout and "memory: rollout plan" in stdout


def test_the_memory_section_trains_the_recipe_and_sets_the_plan_beside_it(report):
    memory = report[0]["sections"]["memory"]
    assert memory["recipe"] == gpu_check.RECIPE and len(memory["loss"]) == gpu_check.DRY_RUN.steps
    assert all(math.isfinite(x) for x in memory["loss"])
    assert set(memory["phases"]) == {"rollout", "teacher", "train", "optimizer"}
    for phase in ("rollout", "teacher", "train"):
        assert memory["phases"][phase]["plan_gib"] > 0
        assert memory["phases"][phase]["measured_gib"] is None  # the CPU has no allocator peak to read
    shape = memory["plan"]["shape"]
    assert (shape["rows_per_rank"], shape["prompt"]) == (gpu_check.DRY_RUN.prompts, gpu_check.DRY_RUN.prompt_tokens)
    components = memory["plan"]["components_gib"]
    assert components["static"]["CUDA context, NCCL, workspaces"] == 0.0  # the plan's CPU kind


def test_fp8_is_skipped_with_its_reason_where_transformer_engine_is_absent(report):
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        fp8 = report[0]["sections"]["fp8"]
        assert "transformer_engine does not import" in fp8["skipped"]
    else:
        pytest.fail("Transformer Engine imports on this CPU machine: the fp8 section would run, rewrite this test")


def test_junit_counts_reads_passes_failures_and_skips(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="4" skipped="1" failures="1" errors="1">'
                   '<testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="assert 1 == 2"/></testcase>'
                   '<testcase classname="a" name="err"><error message="boom"/></testcase>'
                   '<testcase classname="a" name="skip"><skipped message="no"/></testcase>'
                   '</testsuite></testsuites>')
    got = gpu_check.junit_counts(str(xml))
    assert got["tests"] == 4 and got["passed"] == 1 and got["skipped_tests"] == 1
    assert [f["test"] for f in got["failed"]] == ["a::bad", "a::err"] and got["failed"][0]["message"] == "assert 1 == 2"
