"""The embedded demo end to end at CI size: AR teacher 20 steps -> OPDLM student 5 steps -> evaluation."""

from __future__ import annotations

import dataclasses
import json
import os

from nemo_opdlm import demo


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert demo.demo_main(["--quick", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "1/4 task" in printed and "4/4 evaluation" in printed  # progress throughout
    assert "OPDLM student" in printed and "dynamic thr=0.9" in printed and "AR (causal" in printed

    results = json.load(open(os.path.join(out, "demo_results.json")))
    q = demo.QUICK
    # checkpoints: teacher every 10 of 20 steps, student every 5 of 5
    assert [s for s, _ in demo.checkpoints(os.path.join(out, "teacher"))] == [10, 20]
    assert [s for s, _ in demo.checkpoints(os.path.join(out, "student"))] == [5]
    curves = results["curves"]
    assert len(curves["teacher_ar"]) == 3 and len(curves["student_static"]) == 2 == len(curves["student_dynamic"])
    assert all(0.0 <= p["accuracy"] <= 1.0 for c in curves.values() for p in c)
    # token counts against the data: 20 steps x 8 responses whose lengths (+ EOS) the file bounds
    from nemo_opdlm.eval.synthetic import build_tokenizer

    tok = build_tokenizer()
    lens = [len(tok(json.loads(line)["response"])["input_ids"]) + 1 for line in open(os.path.join(out, "task", "train.jsonl"))]
    steps, rows = q["teacher_steps"], q["prompts_per_step"]
    assert steps * rows * min(lens) <= results["teacher_tokens"] <= steps * rows * max(lens)
    # student rollouts: 5 steps x 8 rows x at most max_new_tokens
    assert 0 < results["student_tokens"] <= q["student_steps"] * rows * 32
    table = {(r["model"], r["settings"]["mode"]): r for r in results["table"]}
    assert set(table) == {("teacher (AR)", "ar"), ("teacher as diffusion", "static"),
                          ("teacher as diffusion", "dynamic"), ("OPDLM student", "static"),
                          ("OPDLM student", "dynamic")}
    assert all(r["num_examples"] == q["num_test"] for r in results["table"])
    assert table[("teacher (AR)", "ar")]["tokens_per_round"] == 1.0
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the eval extra is absent: no plot, said so
        assert results["plot"] is None
    else:
        assert open(results["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_preempted_stage_stops_the_demo_without_scoring_it(tmp_path, capsys, monkeypatch):
    """A signal that stops the teacher's training (status ``preempted``) ends the demo with one line and
    exit 1: the half-trained teacher is neither converted nor scored."""
    from nemo_opdlm.training import loop

    real_train = loop.train

    def preempted(cfg):
        short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2, save_every=2),
                                    optim=dataclasses.replace(cfg.optim, warmup_steps=0))
        result = real_train(short)
        return dict(result, status="preempted")

    monkeypatch.setattr(loop, "train", preempted)
    out = str(tmp_path / "demo")
    assert demo.demo_main(["--quick", "--out", out]) == 1
    captured = capsys.readouterr()
    assert ("opdlm demo: the AR teacher's training stopped at step 2 of 20 (preempted): nothing was evaluated; "
            "run `opdlm demo --overwrite` again") in captured.err
    assert "3/4" not in captured.out and not os.path.exists(os.path.join(out, "student"))
