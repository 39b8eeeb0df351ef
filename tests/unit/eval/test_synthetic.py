"""The synthetic arithmetic family: worked answers, determinism, disjoint splits, the tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from nemo_opdlm.eval import synthetic as S
from nemo_opdlm.eval.tasks import answers_match, final_number
from nemo_opdlm.models.config import ConfigError

KNOBS = S.ArithmeticConfig(min_operands=2, max_operands=4, max_value=20, operators=("+", "-", "*"),
                           allow_negative=True, max_abs_result=10_000)


def test_solve_follows_precedence_and_matches_python_eval():
    steps, values = S.solve([3, 4, 2, 5], ["+", "*", "-"])
    assert steps == ["4*2=8", "3+8=11", "11-5=6"]
    assert values[-1] == eval("3+4*2-5") == 6
    rng = random.Random(0)
    for _ in range(300):
        p = S.draw(rng, KNOBS)
        assert p.answer == eval(p.expression)  # independent reference: Python's own precedence
        assert len(p.steps) == p.expression.count("+") + p.expression.count("*") + sum(
            1 for i, c in enumerate(p.expression) if c == "-" and i > 0 and p.expression[i - 1].isdigit())
        assert final_number(p.response) == str(p.answer)
        # every step is arithmetic that holds
        for step in p.steps:
            lhs, rhs = step.rsplit("=", 1)
            assert eval(lhs) == int(rhs)


def test_knobs_are_respected():
    cfg = S.ArithmeticConfig(min_operands=3, max_operands=3, min_value=10, max_value=99, operators=("+",),
                             max_abs_result=1000)
    for p in S.make_split(cfg, "train", 50, seed=1):
        nums = p.expression.split("+")
        assert len(nums) == 3 and all(10 <= int(n) <= 99 for n in nums)
    for p in S.make_split(S.ArithmeticConfig(operators=("-",), max_operands=3), "train", 100, seed=2):
        _, values = S.solve([int(x) for x in p.expression.split("-")], ["-"] * p.expression.count("-"))
        assert min(values) >= 0  # allow_negative=False redraws negative intermediates
    with pytest.raises(ConfigError, match="operators"):
        S.ArithmeticConfig(operators=("/",))
    with pytest.raises(ConfigError, match="min_operands"):
        S.ArithmeticConfig(min_operands=1)


def test_deterministic_by_seed():
    a = S.make_split(KNOBS, "train", 40, seed=3)
    b = S.make_split(KNOBS, "train", 40, seed=3)
    c = S.make_split(KNOBS, "train", 40, seed=4)
    assert a == b
    assert a != c
    assert len({p.expression for p in a}) == 40  # distinct within a split


def test_heldout_split_is_disjoint_from_train_for_any_seeds():
    small = S.ArithmeticConfig(max_operands=2)  # 155 problems in all: both splits get exhausted
    train = {p.expression for s in range(3) for p in S.make_split(small, "train", 10_000, seed=s)}
    test = {p.expression for s in range(3) for p in S.make_split(small, "test", 10_000, seed=s)}
    assert not train & test
    assert len(train) + len(test) == 10 * 10 + 55  # every '+' pair and every non-negative '-' pair
    assert 0.03 < len(test) / (len(train) + len(test)) < 0.2  # about heldout_fraction = 0.1
    # the rule is the hash, independent of the generator: recompute it by hand
    import hashlib
    for e in list(test)[:5]:
        h = int.from_bytes(hashlib.sha256(e.encode()).digest()[:8], "big")
        assert h % 1000 < 100


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = S.build_tokenizer()
    assert len(tok) < 64
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2)
    for p in S.make_split(KNOBS, "train", 50, seed=0):
        text = p.prompt + p.response
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        # one token per character except the words
        assert len(ids) == len(text) - 3 * text.count("####") - text.count("Q:") - text.count("A:")
    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert back("Q: 12*3=? A:")["input_ids"] == tok("Q: 12*3=? A:")["input_ids"]
    assert back.mask_token_id == 2 and back.eos_token_id == 1


def test_write_task(tmp_path):
    data = S.write_task(str(tmp_path / "arith"), S.ArithmeticConfig(), num_train=30, num_test=8, seed=5)
    assert (data.num_train, data.num_test) == (30, 8)
    rows = [json.loads(line) for line in open(data.train)]
    assert set(rows[0]) == {"prompt", "response", "answer", "expression"}
    assert all(answers_match(final_number(r["response"]), r["answer"]) for r in rows)
    test_rows = [json.loads(line) for line in open(data.test)]
    assert not {r["expression"] for r in rows} & {r["expression"] for r in test_rows}
    meta = json.load(open(tmp_path / "arith" / "task.json"))
    assert meta["config"]["max_operands"] == 3 and meta["seed"] == 5


# --- the sort family -----------------------------------------------------------------------------

def test_sort_problems_answers_and_knobs():
    cfg = S.SortConfig(min_length=3, max_length=6, alphabet="abcdef")
    for p in S.make_split(cfg, "train", 200, seed=0):
        assert 3 <= len(p.letters) <= 6 and set(p.letters) <= set("abcdef")
        assert p.answer == "".join(sorted(p.letters)) and p.response == " " + p.answer
        assert p.prompt == f"S: {p.letters} A:"
    assert S.family_of(cfg).name == "sort" and S.family_of(S.ArithmeticConfig()).name == "arithmetic"
    with pytest.raises(ConfigError, match="alphabet"):
        S.SortConfig(alphabet="abz")
    with pytest.raises(ConfigError, match="min_length"):
        S.SortConfig(min_length=1)
    with pytest.raises(ConfigError, match="unknown synthetic task"):
        S.task_config("reverse")


def test_sort_split_is_disjoint_and_deterministic():
    cfg = S.SortConfig(min_length=2, max_length=3, alphabet="abcd")  # 16 + 64 words: both splits exhausted
    train = {p.letters for s in range(3) for p in S.make_split(cfg, "train", 10_000, seed=s)}
    test = {p.letters for s in range(3) for p in S.make_split(cfg, "test", 10_000, seed=s)}
    assert not train & test and len(train) + len(test) == 16 + 64
    assert S.make_split(cfg, "train", 20, seed=1) == S.make_split(cfg, "train", 20, seed=1)


def test_sort_tokenizer_is_its_own_vocabulary(tmp_path):
    tok = S.build_tokenizer("sort")
    arith = S.build_tokenizer("arithmetic")
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2)  # the shared specials
    assert len(tok) <= 32 and "S:" in tok.get_vocab() and "Q:" not in tok.get_vocab()
    assert "#" not in tok.get_vocab() and "a" not in arith.get_vocab()
    for p in S.make_split(S.SortConfig(), "train", 50, seed=0):
        text = p.prompt + p.response
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
        assert len(ids) == len(text) - text.count("S:") - text.count("A:")  # one token per letter and space


def test_write_sort_task_is_scored_by_exact_match(tmp_path):
    from nemo_opdlm.eval import tasks as T

    data = S.write_task(str(tmp_path / "sort"), S.SortConfig(), num_train=20, num_test=6, seed=2)
    assert data.family == "sort" and data.eval_format == "sort"
    meta = json.load(open(tmp_path / "sort" / "task.json"))
    assert meta["family"] == "sort" and meta["config"]["alphabet"] == "abcdefghijkl"
    task = T.load_task(data.eval_format, data.test)
    ex = task.examples[0]
    rec = json.loads(open(data.test).readline())
    assert T.score(task, rec["response"] + "\nS: x", ex.gold, chat=False).correct
    assert not T.score(task, " " + rec["answer"][::-1] + "z", ex.gold, chat=False).correct
