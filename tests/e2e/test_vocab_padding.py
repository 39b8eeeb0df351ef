"""A teacher whose vocabulary differs from the student's only in padding rows (issue 26 item 2).

Qwen2.5-7B has 152,064 rows, Qwen2.5-1.5B 151,936, and both read one tokenizer of 151,665 ids. The
same on tiny models: a teacher of 72 rows, a student of 64, a tokenizer of 60 ids. The run reads the
teacher with its rows past 64 dropped (``RunConfig.teacher_built``); the reference is the same
teacher with those rows cut off by hand (``resize_token_embeddings``) and saved as a 64-row model.
Both runs must give the same losses and gradient norms: full-vocabulary and top-k targets, at TP=1,
at TP=2 with the teacher on the student's layout, and with the teacher at a layout of its own
(full-vocabulary targets re-cut between the two vocabulary splits).
"""

from __future__ import annotations

import json
import os
import random

import pytest

from nemo_opdlm.config import ConfigError, RunConfig, apply_overrides, from_dict, to_dict
from tests.convert_models import save_hf, save_tokenizer
from tests.dist import torchrun
from tests.train_fixtures import make_run

TOKENIZER_IDS, STUDENT_ROWS, TEACHER_ROWS = 60, 64, 72


def _hf(path: str, rows: int, seed: int, tokenizer_ids: int = TOKENIZER_IDS) -> str:
    if not os.path.isdir(path):
        save_hf("qwen3", path, seed=seed, vocab_size=rows, tie_word_embeddings=False)
        save_tokenizer(path, tokenizer_ids)  # the shared tokenizer: ids 0..59, [MASK] = w59
    return path


def _cut_by_hand(src: str, dst: str) -> str:
    """``src``'s model with its vocabulary rows past the student's removed, saved as a model of its own."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(dst):
        model = AutoModelForCausalLM.from_pretrained(src)
        model.resize_token_embeddings(STUDENT_ROWS)  # keeps rows 0..63 of the embedding and the head
        model.save_pretrained(dst)
        save_tokenizer(dst, TOKENIZER_IDS)
    return dst


def models(root: str) -> dict[str, str]:
    return {"teacher": _hf(os.path.join(root, "teacher72"), TEACHER_ROWS, seed=0),
            "cut": _cut_by_hand(os.path.join(root, "teacher72"), os.path.join(root, "teacher64")),
            "student": _hf(os.path.join(root, "student64"), STUDENT_ROWS, seed=1)}


def _prompts(path: str) -> str:
    """Prompts and responses of the tokenizer's ordinary words (written once: ranks share the file)."""
    if os.path.exists(path):
        return path
    rng = random.Random(0)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for _ in range(16):
            words = lambda n: " ".join(f"w{rng.randint(10, 55)}" for _ in range(n))  # noqa: E731
            f.write(json.dumps({"prompt": words(rng.randint(2, 6)), "response": words(rng.randint(3, 9))}) + "\n")
    os.replace(tmp, path)
    return path


def config(root: str, teacher: str, *overrides: str) -> RunConfig:
    """A 2-step OPDLM run: student of 64 rows from its own weights, ``teacher`` as the teacher."""
    from nemo_opdlm.convert.hf_config import model_config_from_hf, read_hf_config

    paths = models(root)
    rows = dict(attention_backend="sdpa", max_position_embeddings=256, make_vocab_size_divisible_by=8)
    base = make_run(root, "train.steps=2", "optim.warmup_steps=0", f"data.path={_prompts(os.path.join(root, 'p.jsonl'))}",
                    "diffusion.mask_token_id=59", f"init.teacher_hf={teacher}", f"init.student_hf={paths['student']}",
                    "train.save_dir=null")
    data = to_dict(base)
    data["model"] = to_dict(model_config_from_hf(read_hf_config(paths["student"]), **rows))
    data["teacher_model"] = to_dict(model_config_from_hf(read_hf_config(teacher), **rows))
    return from_dict(RunConfig, apply_overrides(data, list(overrides)))


def steps(cfg: RunConfig) -> list[float]:
    """Each step's loss and gradient norm, in order."""
    from nemo_opdlm.training.loop import train

    return [value for h in train(cfg)["history"] for value in (h["loss"], h["grad_norm"])]


@pytest.mark.parametrize("top_k", ["null", "4"])
def test_loss_equals_the_teacher_cut_by_hand(tmp_path, top_k):
    root = str(tmp_path)
    paths = models(root)
    padded = config(root, paths["teacher"], f"distill.top_k={top_k}")
    assert (padded.teacher.vocab_size, padded.teacher_built.vocab_size, padded.model.vocab_size) == (72, 64, 64)
    got = steps(padded)
    want = steps(config(root, paths["cut"], f"distill.top_k={top_k}"))
    assert len(got) == 4 and all(value > 0 for value in got)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_a_tokenizer_past_the_shared_rows_is_refused(tmp_path):
    root = str(tmp_path)
    models(root)
    wide = _hf(os.path.join(root, "tok66"), TEACHER_ROWS, seed=0, tokenizer_ids=66)  # ids 64, 65: past the student
    cfg = config(root, models(root)["teacher"], f"init.tokenizer={wide}", "diffusion.mask_token_id=59")
    with pytest.raises(ConfigError, match=r"teacher_model.vocab_size=72 and model.vocab_size=64 differ, and the "
                                          r"tokenizer in .*tok66 has 66 ids: vocabularies may differ only in padding"):
        steps(cfg)


def test_a_teacher_with_fewer_rows_than_the_student_is_refused(tmp_path):
    root = str(tmp_path)
    paths = models(root)
    with pytest.raises(ConfigError, match=r"teacher_model.vocab_size=64 is below model.vocab_size=72: the student's "
                                          r"rows past the teacher's would have no teacher probability"):
        config(root, paths["cut"], "model.vocab_size=72")


LAYOUTS = {"tp2": ("parallel.tp=2",), "own": ("parallel.tp=2", "parallel.teacher.tp=1")}


def worker_vocab(tmp_dir: str) -> None:
    """One run (one per launch: a process starts one runtime) at the layout and with the teacher its
    directory names (``<layout>_<teacher>``): losses and norms to ``steps_<rank>.json``."""
    layout, name = os.path.basename(tmp_dir).split("_")
    root = os.path.dirname(tmp_dir)
    got = steps(config(root, models(root)[name], "distill.top_k=null", *LAYOUTS[layout]))
    with open(os.path.join(tmp_dir, f"steps_{os.environ['RANK']}.json"), "w") as f:
        json.dump(got, f)


@pytest.mark.distributed
def test_tp2_and_the_teachers_own_layout_equal_the_cut_teacher(tmp_path):
    """Full-vocabulary targets at student TP=2: the teacher on the student's split (36 + 36 rows
    before the cut, 32 + 32 after) and the teacher at TP=1 x DP=2 of its own, its 64 columns re-cut to
    the student's two shards on the way back."""
    models(str(tmp_path))
    _prompts(str(tmp_path / "p.jsonl"))
    got = {}
    for layout in LAYOUTS:
        for name in ("teacher", "cut"):
            run = tmp_path / f"{layout}_{name}"
            run.mkdir()
            torchrun("tests.e2e.test_vocab_padding:worker_vocab", 2, str(run), timeout=300)
            got[layout, name] = [json.load(open(run / f"steps_{rank}.json")) for rank in (0, 1)]
    for layout in LAYOUTS:
        assert len(got[layout, "teacher"][0]) == 4
        assert got[layout, "teacher"] == [pytest.approx(want, rel=1e-6, abs=1e-7) for want in got[layout, "cut"]]
