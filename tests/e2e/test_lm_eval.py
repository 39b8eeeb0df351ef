"""lm-evaluation-harness 0.4.13, the real package: ``opdlm lm-eval`` on a local task, the adapter's
registration beside lm-eval's own models, its results (tokens per round), and lm-eval's ``hf`` model
on an exported student (max_gen_toks honoured, log-likelihood refused)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from tests.e2e.test_hf_export import exported  # noqa: F401  (module fixture: an exported student)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS = [{"prompt": f"w{3 + i} w{4 + i} w{5 + i}", "answer": f"w{10 + i}"} for i in range(4)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A directory with two local lm-eval tasks over 4 rows: generation and multiple choice."""
    root = tmp_path_factory.mktemp("tasks")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "gen.yaml").write_text(
        "task: opdlm_tiny_gen\n" + common + 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["w97"]\n  max_gen_toks: 6\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "mc.yaml").write_text(
        "task: opdlm_tiny_mc\n" + common + 'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_choice: ["w3", "w4"]\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n')
    return str(root)


def test_adapter_registers_after_lm_evals_own_models():
    """In a fresh process (lm-eval's registry empty), importing the adapter keeps 'hf' and adds 'opdlm'."""
    code = ("import nemo_opdlm.eval.lm_eval_adapter as A; from lm_eval.api.registry import get_model, model_registry; "
            "print('hf' in model_registry.keys(), 'vllm' in model_registry.keys(), get_model('opdlm') is A.HarnessLM)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "True"]


@pytest.fixture
def adapter_runtime():
    """The one-process runtime the adapter starts inside lm-eval's process, shut down afterwards."""
    from nemo_opdlm.runtime.distributed import current_runtime, shutdown_runtime

    assert current_runtime() is None
    yield
    if current_runtime() is not None:
        shutdown_runtime()


def test_opdlm_lm_eval_on_an_exported_student(exported, adapter_runtime, tasks, tmp_path, monkeypatch, capsys):
    """``opdlm lm-eval`` runs lm-eval's CLI with the opdlm model on an exported student directory;
    the results carry the decoding and the tokens per round."""
    from nemo_opdlm.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = str(tmp_path / "results")
    argv = ["lm-eval", "--model", "opdlm", "--model_args", f"hf={exported[1]},mode=dynamic,threshold=0.5",
            "--tasks", "opdlm_tiny_gen", "--include_path", tasks, "--output_path", out, "--log_samples"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "opdlm generate_until" in err and "4/4" in err  # the progress bar
    results = json.load(open(glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)[0]))
    config = results["config"]
    assert config["opdlm_decoding"].startswith("block=4 dynamic thr=0.5") and config["block_grid"] == "response"
    assert 4 <= config["tokens_generated"] <= 4 * 6  # max_gen_toks=6 per request
    assert config["tokens_per_round"] == pytest.approx(config["tokens_generated"] / config["denoising_rounds"], abs=1e-4)
    assert "exact_match,none" in results["results"]["opdlm_tiny_gen"]
    assert main(["lm-eval", "--model", "opdlm", "--bogus-flag"]) == 2  # lm-eval's own usage error


def test_hf_model_on_exported_student_honours_max_gen_toks_and_refuses_likelihood(exported, tasks, monkeypatch):
    """lm-eval's ``hf`` model generates through the exported ``generate`` (max_length -> max_gen_toks)
    and gets a clear refusal, not numbers, for a multiple-choice task."""
    pytest.importorskip("accelerate")  # lm-eval's hf model needs it (the lm-eval[hf] extra)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(exported[1], trust_remote_code=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(exported[1], trust_remote_code=True)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    manager = TaskManager(include_path=tasks)
    res = simple_evaluate(model=lm, tasks=["opdlm_tiny_gen"], task_manager=manager, log_samples=True)
    for sample in res["samples"]["opdlm_tiny_gen"]:
        generated = sample["resps"][0][0]
        assert 1 <= len(tok(generated, add_special_tokens=False)["input_ids"]) <= 6, generated
    with pytest.raises(ValueError, match="no left-to-right log-likelihood"):
        simple_evaluate(model=lm, tasks=["opdlm_tiny_mc"], task_manager=manager)


def test_checkpoint_without_tokenizer_names_the_model_arg(exported, adapter_runtime, tmp_path):
    from nemo_opdlm.eval.lm_eval_adapter import SamplerLM

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(exported[0], ckpt)
    for name in os.listdir(os.path.join(ckpt, "hf_assets")):
        if name.startswith("tokenizer"):
            os.remove(os.path.join(ckpt, "hf_assets", name))
    with pytest.raises(ValueError, match="the opdlm model arg tokenizer=DIR"):
        SamplerLM(ckpt=ckpt)


def test_block_grid_model_arg_repeats_the_models_or_is_refused(exported, adapter_runtime):
    """``block_grid=`` may only name the grid the model was trained on (an export records it), unless
    ``allow_grid_mismatch=true`` (strings, as lm-eval passes model args)."""
    from nemo_opdlm.errors import ConfigError
    from nemo_opdlm.eval.lm_eval_adapter import SamplerLM

    assert SamplerLM(hf=exported[1]).diffusion.block_grid == "response"
    with pytest.raises(ConfigError, match="trained on the 'response' block grid, not 'absolute'"):
        SamplerLM(hf=exported[1], block_grid="absolute")
    lm = SamplerLM(hf=exported[1], block_grid="absolute", allow_grid_mismatch="true")
    assert lm.diffusion.block_grid == "absolute" and lm.get_model_info()["block_grid"] == "absolute"
