"""The token-efficiency benchmark's summary: seed statistics, tokens to reach a target, lower bounds."""

from __future__ import annotations

import pytest

from benchmarks import token_efficiency as TE


def _run(seed, accs, tokens=(0, 100, 200, 300)):
    points = [{"step": 50 * i, "tokens": float(t), "static": {"accuracy": a, "tokens_per_round": 1.0},
               "dynamic": {"accuracy": a - 0.1, "tokens_per_round": 2.0 + seed}} for i, (t, a) in enumerate(zip(tokens, accs))]
    return {"seed": seed, "points": points}


def test_seed_statistics_per_checkpoint():
    runs = [_run(0, [0.0, 0.4, 0.8, 0.9]), _run(1, [0.0, 0.6, 0.9, 1.0])]
    points = TE.summarize_method(runs)
    assert [p["step"] for p in points] == [0, 50, 100, 150]
    assert points[1]["static"]["accuracy"] == {"mean": 0.5, "min": 0.4, "max": 0.6}
    assert points[2]["dynamic"]["tokens_per_round"] == {"mean": 2.5, "min": 2.0, "max": 3.0}
    with pytest.raises(ValueError, match="different steps"):
        bad = _run(1, [0.0, 0.6, 0.9, 1.0])
        bad["points"][1]["step"] = 60
        TE.summarize_method([runs[0], bad])


def test_reach_ratios_and_lower_bounds():
    """Tokens to 90% of a teacher at 1.0: OPDLM's seeds at 200 and 100 (mean 150); a method whose
    seeds reach at 300 and never (budget 300) is a lower bound >= 2x."""
    runs = {"opdlm": [_run(0, [0.0, 0.4, 0.9, 0.95]), _run(1, [0.0, 0.9, 0.95, 1.0])],
            "sft": [_run(0, [0.0, 0.1, 0.5, 0.9]), _run(1, [0.0, 0.1, 0.2, 0.3])]}
    cell = TE.reach_table(runs, 1.0)["90pct"]["methods"]
    assert [s["tokens"] for s in cell["opdlm"]["static"]["per_seed"]] == [200.0, 100.0]
    assert cell["opdlm"]["static"]["mean_tokens"] == 150.0 and not cell["opdlm"]["static"]["lower_bound"]
    sft = cell["sft"]["static"]
    assert sft["reached"] == "1/2" and sft["lower_bound"] and sft["mean_tokens"] == 300.0
    assert sft["ratio_to_opdlm"] == pytest.approx(2.0)
    on_grid = TE.reach_table({f"{m}@absolute": r for m, r in runs.items()}, 1.0)["90pct"]["methods"]
    assert on_grid["sft@absolute"]["static"]["ratio_to_opdlm"] == pytest.approx(2.0)  # against opdlm@absolute
    final = TE.final_spread(runs)
    assert final["sft"]["static"]["spread"] == pytest.approx(0.6)
    assert final["opdlm"]["static_minus_dynamic"]["mean"] == pytest.approx(0.1)


def test_the_stopping_rule_and_the_cap_measure_against_the_teachers_ar_accuracy():
    """``--until-ratio``'s bar is the teacher's AR accuracy, not its score read as a diffusion student
    before conversion (0.02 here: against that, step 0 already 'reached' 90% and the cap was 0 tokens)."""
    teacher = {"ar": {"accuracy": 1.0}, "static": {"accuracy": 0.26}, "dynamic": {"accuracy": 0.02}}

    def point(tokens, static, dynamic):
        return {"tokens": tokens, "static": {"accuracy": static}, "dynamic": {"accuracy": dynamic}}

    runs = [{"points": [point(0, 0.26, 0.02), point(100, 0.8, 0.8), point(200, 0.96, 0.95)]},
            {"points": [point(0, 0.26, 0.02), point(100, 0.9, 0.9), point(200, 0.97, 0.97)]}]
    tokens, every_seed = TE.opdlm_tokens_to(runs, teacher)
    assert tokens == pytest.approx((166.666666 + 100) / 2) and every_seed  # 0.8 -> 0.95 crosses 0.9 at 2/3
    assert not TE._reached_all(runs[0]["points"][:2], teacher)
    assert TE._reached_all(runs[0]["points"], teacher) == (0.95 >= max(TE.FRACTIONS))
