"""Every bad input a user can give is one line naming the field or file (and the remedy), exit status 2,
and leaves no half-written output: the sweep of issue 14 (config, data, tokenizer, checkpoint,
save_dir, eval, conversion tools).

Each case runs the command line in this process (``nemo_opdlm.cli.main``, the tools' ``main``), on
the tiny models of ``tests/train_fixtures.py``; a run that is refused stops before its models are
built, so the sweep takes seconds per case. ``CASES`` lists them by category; ``test_sweep_counts``
pins the counts the closing note of the issue gives.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest

from nemo_opdlm import cli
from nemo_opdlm.config import dump_yaml
from tests.convert_models import save_hf, save_tokenizer
from tests.dist import ROOT
from tests.train_fixtures import make_run


@dataclass
class Env:
    """The tiny run on disk every case starts from."""

    root: str
    recipe: str
    teacher_hf: str
    llama_hf: str
    ckpt: str
    eval_hf: str
    task: str
    run_dir: str
    trained: str
    """A real 2-step run directory (checkpoint step_0000002, config.yaml, metrics.jsonl)."""
    student_ckpt: str
    """A checkpoint whose config.yaml records an unshifted block-diffusion student."""

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def write(self, name: str, data: bytes | str) -> str:
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return path


@dataclass
class Case:
    argv: list[str]
    """``opdlm`` arguments (or, with ``tool``, the tool's)."""
    needles: tuple[str, ...]
    """What the one line must say: the field or file, the problem, the remedy."""
    absent: list[str] = field(default_factory=list)
    """Paths that must not exist afterwards (no half-written output)."""
    tool: str = ""
    """'import_hf' / 'export_hf': run that tool's main instead of opdlm."""
    unchanged: list[str] = field(default_factory=list)
    """Files that must be byte-identical afterwards (a refused run leaves the record as it was)."""


def tool_main(name: str) -> Callable[[list[str]], int]:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from nemo_opdlm.eval import synthetic as S
    from tests.tiny import write_hf_model

    root = str(tmp_path_factory.mktemp("bad"))
    cfg = make_run(root, "train.save_dir=null")
    recipe = os.path.join(root, "run.yaml")
    with open(recipe, "w") as f:
        f.write(dump_yaml(cfg))
    llama = os.path.join(root, "llama_hf")
    save_hf("llama", llama, seed=1)
    ckpt = os.path.join(root, "teacher_ckpt")
    assert tool_main("import_hf")(["--hf-dir", cfg.init.teacher_hf, "--out", ckpt]) == 0
    eval_hf = write_hf_model(os.path.join(root, "eval_hf"))
    task = S.write_task(os.path.join(root, "task"), S.ArithmeticConfig(), num_train=1, num_test=3, seed=0).test
    run_dir = os.path.join(root, "a_run")
    for step in (1, 2):
        os.makedirs(os.path.join(run_dir, f"step_000000{step}"))
        open(os.path.join(run_dir, f"step_000000{step}", "metadata.json"), "w").write("{}")
    open(os.path.join(run_dir, "latest"), "w").write("step_0000002\n")
    save_tokenizer(os.path.join(root, "tok150"), 150)
    damaged = os.path.join(root, "damaged_ckpt")
    shutil.copytree(ckpt, damaged)
    shard = max((os.path.join(damaged, n) for n in os.listdir(damaged) if n.endswith(".distcp")), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    open(os.path.join(root, "a_file"), "w").write("x")
    resumable = os.path.join(root, "has_checkpoints", "step_0000003")
    os.makedirs(resumable)
    open(os.path.join(resumable, "metadata.json"), "w").write("{}")
    os.makedirs(os.path.join(root, "locked"))
    with open(os.path.join(root, "locked", ".opdlm.lock"), "w") as f:  # held by a live process of this host
        json.dump({"host": socket.gethostname(), "pid": os.getppid(), "started": "now"}, f)
    os.makedirs(os.path.join(root, "users_dir"))
    for name in ("notes.txt", "config.json"):
        open(os.path.join(root, "users_dir", name), "w").write("the user's")
    os.makedirs(os.path.join(root, "no_tok_files"))  # a folder with a config.json but no tokenizer
    shutil.copy(os.path.join(cfg.init.teacher_hf, "config.json"), os.path.join(root, "no_tok_files"))
    _nan_weights(cfg.init.teacher_hf, os.path.join(root, "nan_hf"))
    os.makedirs(os.path.join(root, "step_file_run"))
    open(os.path.join(root, "step_file_run", "step_0000003"), "w").write("not a checkpoint")
    os.makedirs(os.path.join(root, "empty_latest"))
    open(os.path.join(root, "empty_latest", "latest"), "w").close()
    student = os.path.join(root, "student_ckpt")  # the import, recorded as a trained (unshifted) student
    shutil.copytree(ckpt, student)
    with open(os.path.join(student, "config.yaml"), "w") as f:
        f.write(dump_yaml(cfg))
    trained = os.path.join(root, "trained")
    from nemo_opdlm.training.loop import train as run_training

    run_training(make_run(root, "train.steps=2", f"train.save_dir={trained}"))
    return Env(root, recipe, cfg.init.teacher_hf, llama, ckpt, eval_hf, task, run_dir, trained, student)


def _nan_weights(hf_dir: str, out: str) -> None:
    """A copy of ``hf_dir`` with one NaN in the first layer's MLP up-projection."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    tensors = load_file(os.path.join(out, shard))
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, os.path.join(out, shard), metadata={"format": "pt"})


def train(e: Env, *overrides: str, save: str = "") -> list[str]:
    """``opdlm train`` on the tiny recipe, writing (if it ever got that far) to a fresh save_dir."""
    return ["train", "--recipe", e.recipe, f"train.save_dir={save or e.path('never_written')}", *overrides]


def evaluate(e: Env, *extra: str) -> list[str]:
    return ["eval", "--task", "synthetic", "--data", e.task, "--max-new-tokens", "4", *extra]


# --- the cases --------------------------------------------------------------------------------

OK = json.dumps({"prompt": "w11 w12", "response": "w13"})


def data(e: Env, name: str, body: bytes | str, *extra: str) -> list[str]:
    """Train on a prompt file with ``body``."""
    return train(e, f"data.path={e.write(name, body)}", *extra)


def from_ckpt(e: Env, ckpt: str, *extra: str) -> list[str]:
    """Train with the teacher from a megatron checkpoint instead of the HF directory."""
    return train(e, "init.teacher_hf=null", f"init.tokenizer={e.teacher_hf}", f"init.teacher_checkpoint={ckpt}", *extra)


def resume(e: Env, *overrides: str) -> Case:
    """Resume the trained run with ``overrides``: refused before any model is built, its
    config.yaml and metrics.jsonl as they were."""
    record = [os.path.join(e.trained, name) for name in ("config.yaml", "metrics.jsonl", "latest")]
    return Case(["train", "--recipe", e.recipe, f"train.save_dir={e.trained}", *overrides], (), unchanged=record)


def eval_data(e: Env, name: str, body: bytes | str) -> list[str]:
    return ["eval", "--task", "exact", "--hf", e.eval_hf, "--data", e.write(name, body)]


Builder = Callable[[Env], Case]
CASES: dict[str, dict[str, Builder]] = {
    "config": {
        "yaml_syntax": lambda e: Case(["train", "--recipe", e.write("syntax.yaml", "train: {steps: 3\n  x: [\n")],
                                      ("syntax.yaml: not valid YAML", "line 2, column 4")),
        "yaml_top_level_list": lambda e: Case(["train", "--recipe", e.write("list.yaml", "- 1\n- 2\n")],
                                              ("list.yaml: the top level must be a mapping",)),
        "yaml_empty": lambda e: Case(["train", "--recipe", e.write("empty.yaml", "")], ("empty.yaml is empty",)),
        "yaml_missing": lambda e: Case(["train", "--recipe", e.path("nope.yaml")], ("nope.yaml does not exist",)),
        "yaml_unknown_key": lambda e: Case(
            ["train", "--recipe", e.write("key.yaml", open(e.recipe).read().replace("  steps:", "  stepz:"))],
            ("key.yaml: unknown config key 'train.stepz'; did you mean 'train.steps'",)),
        "section_set_to_a_number": lambda e: Case(train(e, "train=5"), ("'train' is a section", "train.steps=")),
        "optional_section_set_to_a_list": lambda e: Case(train(e, "data=[1]"), ("'data' is a section", "data.path=")),
        "unknown_key": lambda e: Case(train(e, "train.stepz=3"),
                                      ("unknown config key 'train.stepz'; did you mean 'train.steps'",)),
        "not_an_integer": lambda e: Case(train(e, "train.steps=abc"), ("train.steps must be an integer, got 'abc'",)),
        "override_not_yaml": lambda e: Case(train(e, "train.steps=[3"),
                                            ("override 'train.steps=[3'", "not valid YAML")),
        "override_without_equals": lambda e: Case(train(e, "train.steps"), ("must look like key=value",)),
        "mapping_set_to_a_number": lambda e: Case(train(e, "rollout.max_length_by_domain=5"),
                                                  ("rollout.max_length_by_domain must be a mapping",)),
        "string_set_to_a_number": lambda e: Case(train(e, "init.tokenizer=5"), ("init.tokenizer must be a string",)),
        "recipe_unknown": lambda e: Case(["train", "--recipe", "no_such_recipe"],
                                         ("no recipe named 'no_such_recipe'; recipes: ", "opdlm recipes lists them")),
        "recipe_module_only": lambda e: Case(["train", "--recipe", "tiny"],
                                             ("--recipe tiny names a module, not a recipe", "tiny:tiny_self_tp1_pp1_2g")),
        "recipe_module_misspelt": lambda e: Case(["train", "--recipe", "tinny:tiny_self_tp1_pp1_2g"],
                                                 ("recipe module 'tinny' not found; did you mean 'tiny'",)),
        "recipe_partial_yaml": lambda e: Case(["train", "--recipe", e.write("part.yaml", "train: {steps: 3}\n")],
                                              ("part.yaml has no diffusion:", "--config")),
        "override_bad_interpolation": lambda e: Case(train(e, "train.save_dir=${nope}/x"),
                                                     ("cannot resolve train.save_dir", "'nope' not found")),
        "recipe_near_miss": lambda e: Case(["train", "--recipe", "tiny:tiny_self_tp1_pp1"],
                                           ("did you mean 'tiny_self_tp1_pp1_2g'",)),
        "recipe_not_yaml": lambda e: Case(["train", "--recipe", e.write("run.json", "{}")],
                                          ("run.json is a file but not a YAML",)),
        "threshold_zero": lambda e: Case(train(e, "rollout.threshold=0"), ("rollout.threshold must be in (0, 1]",)),
        "mask_outside_vocab": lambda e: Case(train(e, "diffusion.mask_token_id=500"),
                                             ("[MASK] id 500 (diffusion.mask_token_id) is outside the model's vocabulary (ids 0..99)",)),
        "method_unknown": lambda e: Case(train(e, "distill.method=nope"), ("'nope'",)),
        "sft_without_responses": lambda e: Case(train(e, "distill.method=sft", "data.response_field=null"),
                                                ("distill.method=sft needs data.response_field",)),
        "lr_nan": lambda e: Case(train(e, "optim.lr=.nan"), ("optim.lr must be a number >= 0, got nan",)),
        "lr_negative": lambda e: Case(train(e, "optim.lr=-0.001"), ("optim.lr must be a number >= 0, got -0.001",)),
        "warmup_not_below_steps": lambda e: Case(
            train(e, "optim.warmup_steps=3"),
            ("optim.warmup_steps=3 >= train.steps=3", "set optim.warmup_steps below train.steps")),
        "recipe_is_a_model": lambda e: Case(
            ["train", "--recipe", "nemo_opdlm.recipes.models:qwen3_0_6b"],
            ("--recipe nemo_opdlm.recipes.models:qwen3_0_6b is a model config", "`opdlm recipes` lists the recipes")),
        "recipe_needs_arguments": lambda e: Case(
            ["train", "--recipe", "nemo_opdlm.recipes.base:paper_run"],
            ("is a function needing arguments (name, student, ", "`opdlm recipes` lists the recipes")),
        "plan_without_a_config": lambda e: Case(["plan"], ("no config given", "--config")),
    },
    "data": {
        "data_missing": lambda e: Case(train(e, f"data.path={e.path('absent.jsonl')}"),
                                       ("data.path", "absent.jsonl does not exist")),
        "data_empty": lambda e: Case(data(e, "empty.jsonl", "\n\n"), ("empty.jsonl holds no records",)),
        "data_bad_json": lambda e: Case(data(e, "bad.jsonl", OK + '\n{"prompt": \n'), ("bad.jsonl:2: not valid JSON",)),
        "data_not_utf8": lambda e: Case(data(e, "latin1.jsonl", OK.encode() + b'\n{"prompt": "caf\xe9"}\n'),
                                        ("latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 16)", "re-encode")),
        "data_json_not_utf8": lambda e: Case(data(e, "latin1.json", b"[\n" + OK.encode() + b',\n{"prompt": "\xff"}]\n'),
                                             ("latin1.json:3: not UTF-8",)),
        "data_jsonl_read_as_parquet": lambda e: Case(data(e, "p.jsonl", OK + "\n", "data.format=parquet"),
                                                     ("p.jsonl: not a Parquet file", "set data.format=jsonl")),
        "data_no_prompt_field": lambda e: Case(data(e, "q.jsonl", json.dumps({"question": "w11"}) + "\n"),
                                               ("q.jsonl: no field 'prompt'", "data.prompt_field")),
        "data_record_not_object": lambda e: Case(data(e, "list.jsonl", OK + "\n[1, 2]\n"),
                                                 ("list.jsonl:2: the record is a list",)),
        "data_prompt_not_text": lambda e: Case(
            data(e, "num.jsonl", OK + "\n" + json.dumps({"prompt": 5, "response": "w1"}) + "\n"),
            ("num.jsonl:2: a prompt must be a string", "got int")),
        "data_response_not_text": lambda e: Case(data(e, "resp.jsonl", json.dumps({"prompt": "w11", "response": [1]})),
                                                 ("resp.jsonl:1: the response ('response') is a list",)),
        "data_only_unknown_tokens": lambda e: Case(
            data(e, "unk.jsonl", "\n".join(json.dumps({"prompt": p, "response": "w3"}) for p in ("héllo", "日本"))),
            ("unk.jsonl: all 2 records were dropped", "2 with text the tokenizer encodes as its unknown token 'w0'")),
        "data_all_too_long": lambda e: Case(
            data(e, "long.jsonl", json.dumps({"prompt": "w11 " * 500_000, "response": "w3"})),
            ("long.jsonl: all 1 records were dropped (1 prompts longer than data.max_prompt_tokens=16",)),
        "data_folder_without_dataset": lambda e: Case(train(e, f"data.path={e.path('task')}"),
                                                      ("neither a saved `datasets` dataset",)),
        "data_unknown_extension": lambda e: Case(data(e, "p.txt", "w11\n"), ("cannot tell the format of", "p.txt",
                                                                             "data.format")),
        "data_jsonl_format_on_a_folder": lambda e: Case(train(e, f"data.path={e.path('task')}", "data.format=jsonl"),
                                                        ("is a folder, not a jsonl file",)),
        "data_prompt_nan": lambda e: Case(data(e, "nan.jsonl", OK + '\n{"prompt": NaN, "response": "w13"}\n'),
                                          ("nan.jsonl:2: the field 'prompt' (data.prompt_field) is ",
                                           "NaN, not a string", "give it text, or remove the record")),
        "data_array_of_numbers": lambda e: Case(data(e, "nums.json", "[1, 2, 3]\n"),
                                                ("nums.json (record 0): the record is a number (1), not an object",)),
    },
    "tokenizer": {
        "tokenizer_missing": lambda e: Case(train(e, f"init.tokenizer={e.path('no_tok')}"),
                                            ("init.tokenizer", "no_tok is not a directory")),
        "tokenizer_larger_than_model": lambda e: Case(train(e, f"init.tokenizer={e.path('tok150')}"),
                                                      ("tok150 has 150 tokens but model.vocab_size=100",)),
        "mask_is_an_ordinary_token": lambda e: Case(train(e, "diffusion.mask_token_id=42"),
                                                    ("diffusion.mask_token_id=42 is the ordinary token 'w42'",)),
        "tokenizer_folder_without_files": lambda e: Case(
            train(e, f"init.tokenizer={e.path('no_tok_files')}"),
            ("init.tokenizer: ", "no_tok_files has no tokenizer files (none of tokenizer.json", "set init.tokenizer")),
    },
    "checkpoint": {
        "model_fewer_layers_than_weights": lambda e: Case(
            train(e, "model.num_layers=1"),
            ("teacher_hf/config.json describes another model", "model.num_layers=1 vs num_hidden_layers=2",
             "set model.*")),
        "model_other_width_than_weights": lambda e: Case(
            train(e, "model.hidden_size=32", "model.head_dim=8"),
            ("model.hidden_size=32 vs hidden_size=64; model.head_dim=8 vs head_dim=24",)),
        "model_untied_weights_tied": lambda e: Case(train(e, "model.tie_word_embeddings=false"),
                                                    ("model.tie_word_embeddings=False vs tie_word_embeddings=True",)),
        "teacher_checkpoint_missing": lambda e: Case(from_ckpt(e, e.path("gone")),
                                                     ("init.teacher_checkpoint", "gone does not exist")),
        "teacher_checkpoint_of_another_model": lambda e: Case(from_ckpt(e, e.ckpt, "model.num_layers=1"),
                                                              ("teacher_ckpt holds another model",
                                                               "model.num_layers=1 vs")),
        "teacher_checkpoint_truncated": lambda e: Case(from_ckpt(e, e.path("damaged_ckpt")),
                                                       ("damaged_ckpt/__0_", "truncated or cut short")),
        "teacher_weights_nan": lambda e: Case(
            train(e, f"init.teacher_hf={e.path('nan_hf')}"),
            ("nan_hf/model-0", "the weight 'model.layers.0.mlp.up_proj.weight' holds NaN (1 of ",
             "download or export them again")),
    },
    "save_dir": {
        "save_dir_under_a_file": lambda e: Case(train(e, save=e.path("a_file/run")),
                                                ("train.save_dir=", "a_file/run", "a part of this path is a file")),
        "save_dir_is_a_file": lambda e: Case(train(e, save=e.path("a_file")), ("train.save_dir=", "a_file",
                                                                                "not a directory")),
        "save_dir_would_be_overwritten": lambda e: Case(train(e, "train.resume=false", save=e.path("has_checkpoints")),
                                                        ("already holds 1 checkpoint(s)", "train.overwrite=true")),
        "save_dir_locked_by_a_live_run": lambda e: Case(train(e, save=e.path("locked")),
                                                        ("being written by another run", f"pid {os.getppid()}")),
        "save_dir_step_name_is_a_file": lambda e: Case(
            train(e, save=e.path("step_file_run")),
            ("train.save_dir=", "step_file_run/step_0000003 is a file", "remove or move it")),
        "save_dir_latest_is_empty": lambda e: Case(
            train(e, save=e.path("empty_latest")),
            ("empty_latest/latest is empty and", "holds no complete checkpoint: delete")),
    },
    "resume": {
        "resume_with_another_dataset": lambda e: dataclasses.replace(
            resume(e, f"data.path={e.write('other.jsonl', (OK + chr(10)) * 12)}"),
            needles=("cannot resume the data cursor of", "trained/step_0000002",
                     "the usable prompts of data.path: 16 when saved, 12 now", "set data.path back")),
        "resume_with_another_seed": lambda e: dataclasses.replace(
            resume(e, "train.seed=7"), needles=("cannot resume the data cursor", "train.seed: 1234 when saved, 7 now", "set train.seed back")),
        "resume_with_another_batch": lambda e: dataclasses.replace(
            resume(e, "train.prompts_per_step=8"),
            needles=("cannot resume the data cursor", "train.prompts_per_step: 4 when saved, 8 now",
                     "set train.prompts_per_step back")),
        "resume_with_fewer_steps": lambda e: dataclasses.replace(
            resume(e, "train.steps=1", "optim.warmup_steps=0"),
            needles=("trained/step_0000002: it is at step 2, past train.steps=1", "set train.steps above 2")),
    },
    "eval": {
        "eval_ckpt_is_a_run_directory": lambda e: Case(
            evaluate(e, "--ckpt", e.run_dir),
            ("a_run is a training run directory, not a checkpoint: use ", "a_run/step_0000002",
             "(its checkpoints: step_0000001, step_0000002)")),
        "eval_ckpt_missing": lambda e: Case(evaluate(e, "--ckpt", e.path("no_ckpt")),
                                            ("--ckpt", "no_ckpt does not exist")),
        "eval_ckpt_not_a_checkpoint": lambda e: Case(evaluate(e, "--ckpt", e.path("task")),
                                                     ("is not a megatron-core checkpoint (no metadata.json)",)),
        "eval_mask_outside_vocab": lambda e: Case(
            evaluate(e, "--hf", e.eval_hf, "--mask-token-id", "99"),
            ("[MASK] id 99 (from --mask-token-id) is outside the model's vocabulary (ids 0..31)",)),
        "eval_tokenizer_larger_than_model": lambda e: Case(
            evaluate(e, "--hf", e.eval_hf, "--tokenizer", e.teacher_hf),
            ("teacher_hf has 100 tokens but the vocab_size of", "eval_hf=32")),
        "eval_output_under_a_file": lambda e: Case(
            evaluate(e, "--hf", e.eval_hf, "--output", e.path("a_file/res.json")),
            ("--output", "a_file/res.json cannot be written", "a_file exists and is not a directory")),
        "eval_output_is_a_directory": lambda e: Case(evaluate(e, "--hf", e.eval_hf, "--output", e.root),
                                                     ("is a directory: give a file name",)),
        "eval_data_not_utf8": lambda e: Case(eval_data(e, "e_latin1.jsonl", b'{"prompt": "a", "answer": "\xe9"}\n'),
                                             ("e_latin1.jsonl:1: not UTF-8",)),
        "eval_data_jsonl_named_parquet": lambda e: Case(eval_data(e, "e.parquet", '{"prompt": "a", "answer": "b"}\n'),
                                                        ("e.parquet: not a Parquet file",)),
        "eval_threshold_above_one": lambda e: Case(evaluate(e, "--hf", e.eval_hf, "--threshold", "2"),
                                                   ("threshold must be in (0, 1]",)),
        "eval_two_models": lambda e: Case(evaluate(e, "--hf", e.eval_hf, "--ckpt", e.ckpt),
                                          ("give exactly one model",)),
        "eval_ar_on_an_unshifted_student": lambda e: Case(
            evaluate(e, "--ckpt", e.student_ckpt, "--modes", "ar"),
            ("--modes ar: ", "student_ckpt is a block-diffusion student", "distill.method=opdlm",
             "diffusion.shift_logits=false", "predicts each masked token at its own position",
             "--modes static dynamic")),
    },
    "convert": {
        "export_wrong_hf_source": lambda e: Case(
            ["--ckpt", e.ckpt, "--out", e.path("exp_wrong"), "--hf-source", e.llama_hf],
            ("llama_hf/config.json describes another model than", "family='qwen3' vs architectures='llama'",
             "rotary_base=10000.0 vs rope_theta=500000.0", "tie_word_embeddings=True vs tie_word_embeddings=False",
             "pass the HF directory the checkpoint was made from"),
            absent=[e.path("exp_wrong")], tool="export_hf"),
        "export_overwrite_of_a_users_directory": lambda e: Case(
            ["--ckpt", e.ckpt, "--out", e.path("users_dir"), "--overwrite"],
            ("users_dir is not a previous Hugging Face export", "notes.txt", "--overwrite would delete"),
            tool="export_hf"),
        "import_overwrite_of_a_users_directory": lambda e: Case(
            ["--hf-dir", e.teacher_hf, "--out", e.path("users_dir"), "--overwrite"],
            ("users_dir is not a previous megatron-core checkpoint", "(config.json, notes.txt)"), tool="import_hf"),
        "export_target_is_a_file": lambda e: Case(["--ckpt", e.ckpt, "--out", e.path("a_file")],
                                                  ("a_file exists and is not a directory",), tool="export_hf"),
        "export_threshold_above_one": lambda e: Case(
            ["--ckpt", e.ckpt, "--out", e.path("exp_thr"), "--threshold", "1.5"],
            ("--threshold / --steps-per-block: decode.threshold must be in (0, 1]",), absent=[e.path("exp_thr")],
            tool="export_hf"),
        "export_steps_beyond_the_block": lambda e: Case(
            ["--ckpt", e.ckpt, "--out", e.path("exp_steps"), "--mask-token-id", "99", "--steps-per-block", "8"],
            ("steps_per_block=8 exceeds the block size (diffusion.block_size=4)",), absent=[e.path("exp_steps")],
            tool="export_hf"),
        "export_no_model_description": lambda e: Case(["--ckpt", e.path("task"), "--out", e.path("exp_none")],
                                                      ("carries no model description", "--hf-source"),
                                                      absent=[e.path("exp_none")], tool="export_hf"),
    },
}
PARAMS = [(cat, name) for cat, cases in CASES.items() for name in cases]


def _leftovers(root: str) -> list[str]:
    return [os.path.join(d, n) for d, dirs, _ in os.walk(root) for n in dirs if ".tmp-" in n or ".old-" in n]


@pytest.mark.parametrize("category,name", PARAMS, ids=[n for _, n in PARAMS])
def test_bad_input_is_one_line(env, category, name, capsys, monkeypatch):
    case = CASES[category][name](env)
    if category == "eval":  # every refusal comes before the evaluation runs
        monkeypatch.setattr("nemo_opdlm.eval.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluation ran"))
    if category == "resume":  # refused before any model is built
        monkeypatch.setattr("nemo_opdlm.training.setup.build_models", lambda *a, **k: pytest.fail("models built"))
    kept = {path: open(path, "rb").read() for path in case.unchanged}
    before = sorted(os.listdir(env.root))
    capsys.readouterr()
    rc = tool_main(case.tool)(case.argv) if case.tool else cli.main(case.argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    prog = f"{case.tool}: error" if case.tool else f"opdlm {case.argv[0]}: "
    assert lines[0].startswith(prog), lines[0]
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    for path in case.absent + [env.path("never_written")]:
        assert not os.path.exists(path), path
    assert sorted(os.listdir(env.root)) == before  # nothing new beside the inputs (no staging, no empty run dir)
    for path, data in kept.items():
        assert open(path, "rb").read() == data, path
    assert not _leftovers(env.root), _leftovers(env.root)


def test_sweep_counts():
    """The counts the issue's closing note quotes: at least 40 bad inputs over config, data,
    tokenizer, checkpoint, save_dir, eval (and the conversion tools); issue 26 item 5 added 22, among
    them the resume category (a refused resume leaves config.yaml and metrics.jsonl as they were)."""
    counts = {cat: len(cases) for cat, cases in CASES.items()}
    assert counts == {"config": 30, "data": 17, "tokenizer": 4, "checkpoint": 7, "save_dir": 6, "resume": 4,
                      "eval": 12, "convert": 7}, counts
    assert sum(counts.values()) >= 40


# --- what the sweep's table cannot express ----------------------------------------------------

def test_debug_flag_and_variable_show_the_traceback(env, capsys, monkeypatch):
    from nemo_opdlm.errors import ConfigError

    argv = ["train", "--recipe", env.write("dbg.yaml", "train: [\n")]
    assert cli.main(argv) == 2
    with pytest.raises(ConfigError, match="dbg.yaml: not valid YAML"):
        cli.main(["--debug", *argv])
    monkeypatch.setenv("OPDLM_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli.main(argv)
    capsys.readouterr()
    assert cli.main(["--help"]) == 0
    assert "--debug (or OPDLM_DEBUG=1)" in capsys.readouterr().out


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk full: no space left to write /d/x"),
                                        (errno.EROFS, "/d/x is on a read-only filesystem"),
                                        (errno.EACCES, "permission denied for /d/x")])
def test_os_errors_are_one_line(capsys, code, words):
    def fail() -> int:
        raise OSError(code, os.strerror(code), "/d/x")

    assert cli.guarded("opdlm train", fail) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("opdlm train: error (") and words in err[0], err
    assert err[0].endswith("(OPDLM_DEBUG=1 for the traceback)")


def test_nonfinite_loss_reaches_the_user_as_one_line(capsys):
    from nemo_opdlm.errors import NonFiniteLossError

    def fail() -> int:
        raise NonFiniteLossError("3 consecutive non-finite losses (train.max_nonfinite_in_row=3); lower optim.lr")

    assert cli.guarded("opdlm train", fail) == 2
    assert capsys.readouterr().err == ("opdlm train: error (NonFiniteLossError): 3 consecutive non-finite losses "
                                       "(train.max_nonfinite_in_row=3); lower optim.lr\n")


@pytest.mark.parametrize("code,words", [(errno.EROFS, "is on a read-only filesystem"),
                                        (errno.ENOSPC, "disk full: no space left to write")])
def test_save_dir_on_a_read_only_or_full_disk(env, capsys, monkeypatch, code, words):
    """Where the lock cannot be written, every rank is refused before the models load (the OSError
    used to escape on rank 0 only, as a traceback)."""
    real = os.open

    def refusing(path, *args, **kw):
        if str(path).endswith(".opdlm.lock"):
            raise OSError(code, os.strerror(code), path)
        return real(path, *args, **kw)

    monkeypatch.setattr(os, "open", refusing)
    capsys.readouterr()
    assert cli.main(train(env, save=env.path("ro_run"))) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "train.save_dir=" in err[0] and "ro_run/.opdlm.lock" in err[0] and words in err[0], err
    assert not os.path.exists(env.path("ro_run"))


def test_full_disk_during_a_checkpoint_save(env, capsys, monkeypatch):
    """torch's zip writer reports a full disk as 'unexpected pos 704 vs 598': the save now says
    'disk full' and names the checkpoint; nothing of it is left, and no 'latest' points at it."""
    import shutil as sh
    from collections import namedtuple

    from megatron.core import dist_checkpointing

    from torch.distributed.checkpoint.api import CheckpointException

    def no_room(*args, **kw):  # what megatron's async writer raises on a full tmpfs (a BaseException)
        inner = RuntimeError("Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        raise CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (inner, None)})

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(dist_checkpointing, "save", no_room)
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 4096))
    run = env.path("full_run")
    capsys.readouterr()
    assert cli.main(train(env, "train.steps=1", "optim.warmup_steps=0", save=run)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[opdlm] ")]  # progress notes
    assert len(err) == 1 and "disk full: no space left to write" in err[0] and "full_run/step_0000001" in err[0], err
    assert "4096 bytes free" in err[0] and "unexpected pos 704 vs 598" in err[0]
    assert not [n for n in os.listdir(run) if n.startswith(("step_", ".step_", "latest"))], os.listdir(run)


def test_a_killed_imports_staging_is_cleared_by_the_next(env, capsys):
    """A SIGKILLed tools/import_hf.py left .NAME.tmp-* beside --out forever: the next import to that
    --out removes what a dead process left, and keeps what a live one is writing."""
    from nemo_opdlm.checkpoint.staging import clear_leftovers

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    out = env.path("reimport")
    killed = env.path(f".reimport.tmp-{dead}@{host}.abc123")
    live = env.path(f".reimport.tmp-{os.getppid()}@{host}.def456")
    for d in (killed, live):
        os.makedirs(d)
        open(os.path.join(d, "__0_0.distcp"), "w").write("half")
    capsys.readouterr()
    assert tool_main("import_hf")(["--hf-dir", env.teacher_hf, "--out", out]) == 0
    assert not os.path.exists(killed) and os.path.isdir(live) and os.path.isfile(os.path.join(out, "metadata.json"))
    assert f"removed {killed}" in capsys.readouterr().out
    shutil.rmtree(live)
    # killed between moving the old version aside and renaming the new one in: the old one comes back
    aside = env.path(f".reimport.old-{dead}@{host}.ghi789")
    os.rename(out, aside)
    clear_leftovers(out, note=lambda m: None)
    assert os.path.isfile(os.path.join(out, "metadata.json")) and not os.path.exists(aside)
    shutil.rmtree(out)


@pytest.mark.distributed
def test_under_torchrun_each_failing_rank_prints_one_line(env):
    """Two ranks, a save_dir that cannot be created: at most one line per rank, no '[rank0]:' traceback
    (plain torchrun's agent still prints its ChildFailedError summary after them, quoting each rank's
    line from its error file as the 'traceback'; the project's launcher prints one line instead,
    tests/e2e/test_train_signals.py)."""
    from tests.dist import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "nemo_opdlm.cli", *train(env, save=env.path("a_file/run"))]
    envs = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=envs, capture_output=True, text=True, timeout=240, cwd=env.root)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    ours = [line for line in out.splitlines() if line.startswith("[rank") and "opdlm train: error" in line]
    quoted = [line for line in out.splitlines() if line.strip().startswith("traceback : [rank")]
    assert all("opdlm train: error" in line for line in quoted)  # the error file, not a traceback
    # every rank meets the error; torchrun stops (SIGTERM) a rank still shutting down once the first exits
    ranks = [line.split("]")[0] for line in ours]
    assert 1 <= len(ranks) == len(set(ranks)) and set(ranks) <= {"[rank 0", "[rank 1"}, out[-3000:]
    assert all("a part of this path is a file" in line for line in ours)
    assert "[rank0]:" not in out and "[rank1]:" not in out, out[-3000:]


def test_causal_decoding_of_a_student_is_refused_or_said_what_it_measures(env, tmp_path):
    """``opdlm eval --modes ar`` reads a model's records before building it: an unshifted student
    (a trainer checkpoint's config.yaml, an exported config.json) is refused (the sweep's
    eval_ar_on_an_unshifted_student through the CLI); a shifted one is decoded, with a note saying
    what the score measures; an AR model (an import: no config.yaml) is neither."""
    import yaml

    from nemo_opdlm.convert.hf_config import STUDENT_ARCHITECTURE
    from nemo_opdlm.errors import ConfigError
    from nemo_opdlm.eval.loading import causal_decoding_note

    shifted = str(tmp_path / "shifted")
    shutil.copytree(env.student_ckpt, shifted)
    saved = yaml.safe_load(open(os.path.join(shifted, "config.yaml")))
    saved["diffusion"]["shift_logits"] = True
    with open(os.path.join(shifted, "config.yaml"), "w") as f:
        yaml.safe_dump(saved, f)
    note = causal_decoding_note(None, shifted)
    assert note.startswith(f"note: --modes ar decodes {shifted}, a block-diffusion student with shifted logits ("), note
    assert "diffusion.shift_logits=true" in note and "not its block decoding" in note
    assert causal_decoding_note(None, env.ckpt) is None and causal_decoding_note(env.eval_hf, None) is None
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "config.json").write_text(json.dumps({"architectures": [STUDENT_ARCHITECTURE], "shift_logits": False}))
    with pytest.raises(ConfigError, match=r"--modes ar: .*exported is a block-diffusion student \(.*config.json: an "
                                          r"exported student, shift_logits=False\)"):
        causal_decoding_note(str(exported), None)
