"""``opdlm eval``: score a student (or the AR teacher) on a verifiable task file from the command line.

One job: parse the command line, start the runtime, load the model (``loading.load_model``: an HF
directory of an AR model, or a megatron-core distributed checkpoint written by the converter or the
trainer), run
:func:`evaluate.evaluate` for every requested decoding mode, print each score with its settings and
a closing table, and write the results (with per-example generations) as JSON. Non-goals: the
decoding and the scoring themselves.

Examples::

    opdlm eval --ckpt runs/student/final --task gsm8k --data gsm8k_test.jsonl --modes static dynamic
    opdlm eval --hf Qwen3-0.6B --task math --data math500.jsonl --modes ar --max-new-tokens 1024
    torchrun --nproc_per_node=2 -m nemo_opdlm.eval.cli --ckpt ... --tp 2 ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from nemo_opdlm.data.formats import FORMATS
from nemo_opdlm.rollout.decode import MODES


def _default(name: str):
    """The evaluation's default for a decoding setting (``DecodeSettings``: written once, there)."""
    from nemo_opdlm.eval.settings import DecodeSettings

    return DecodeSettings.__dataclass_fields__[name].default


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def check_output(path: str) -> None:
    """``--output`` can be written, checked before anything runs (it used to fail after the whole
    evaluation, losing the results): its directory is created and a file of this process opened
    there (removed again; every rank of a job can check at once); an existing file is opened for
    appending, which leaves it unchanged."""
    from nemo_opdlm.errors import ConfigError, describe_os_error

    if os.path.isdir(path):
        example = os.path.join(path, "results.json")
        raise ConfigError(f"--output {path} is a directory: give a file name, e.g. {example}")
    probe = path if os.path.exists(path) else f"{path}.{os.getpid()}.probe"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(probe, "a"):
            pass
        if probe != path:
            os.remove(probe)
    except OSError as err:
        if err.filename == probe:
            err.filename = path
        raise ConfigError(f"--output {path} cannot be written: {describe_os_error(err)}") from None


def write_output(path: str, results: dict) -> None:
    """The results as JSON, written whole or not at all (a temporary file renamed into place)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opdlm eval", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("model")
    src.add_argument("--hf", help="HF directory of an AR model (the teacher, or a student initialised from it)")
    src.add_argument("--ckpt", help="megatron-core torch_dist checkpoint directory")
    src.add_argument("--prefix", default="", help="sharded-key prefix of the model inside --ckpt")
    src.add_argument("--tokenizer", help="tokenizer directory (default: --hf, or --ckpt/hf_assets)")
    src.add_argument("--mask-token-id", type=int, help="[MASK] id (default: checkpoint metadata or tokenizer)")
    src.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size of this job")
    src.add_argument("--pp", type=_positive, default=1, help="pipeline-parallel size of this job")
    task = p.add_argument_group("task")
    task.add_argument("--task", required=True, choices=sorted(FORMATS) + ["exact"],
                      help="answer format: gsm8k, math, synthetic (the arithmetic family), sort, or exact")
    task.add_argument("--data", required=True, help="JSONL / JSON / Parquet file or a save_to_disk folder")
    task.add_argument("--split", default="test", help="split of a saved DatasetDict")
    task.add_argument("--limit", type=_positive, help="score only the first N examples")
    task.add_argument("--num-fewshot", type=int, default=0, help="worked examples put before each question")
    task.add_argument("--fewshot-data", help="file with few-shot examples (default: the head of --data)")
    task.add_argument("--question-field", help="'exact' task: the prompt field (default 'prompt')")
    task.add_argument("--answer-field", help="'exact' task: the answer field (default 'answer')")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--modes", nargs="+", default=["static", "dynamic"], choices=MODES,
                     help="decoding modes to score: ar (causal teacher), static, dynamic")
    dec.add_argument("--block-size", type=_positive, help="default: checkpoint metadata, else 4")
    dec.add_argument("--block-grid", metavar="{response,absolute}",
                     help="where blocks fall (diffusion.block_grid); default: the one the model records (a model "
                          "that records none: the default grid); another one is refused")
    dec.add_argument("--allow-grid-mismatch", action="store_true",
                     help="decode on a --block-grid the model was not trained on (to measure the mismatch)")
    dec.add_argument("--steps-per-block", type=_positive, help="default: block size (1 token per round)")
    dec.add_argument("--threshold", type=float, default=_default("threshold"),
                     help="dynamic mode: unmask every position whose confidence exceeds this, in (0, 1]")
    dec.add_argument("--temperature", type=float, default=_default("temperature"),
                     help="0 = greedy (the paper's evaluation)")
    dec.add_argument("--max-new-tokens", type=_positive, default=_default("max_new_tokens"),
                     help="generation length limit")
    dec.add_argument("--chat-template", default=_default("chat_template"), choices=("auto", "always", "never"),
                     help="wrap prompts in the tokenizer's chat template: auto = when it has one")
    dec.add_argument("--batch-size", type=_positive, default=_default("batch_size"), help="prompts decoded together")
    dec.add_argument("--no-cache", action="store_true", help="decode without the KV cache (reference path)")
    dec.add_argument("--seed", type=int, default=_default("seed"), help="sampler seed (with --temperature > 0)")
    p.add_argument("--output", help="write results (and per-example generations) to this JSON file (checked "
                                    "writable before the evaluation starts)")
    return p.parse_args(argv)


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``opdlm eval``; returns the process exit code."""
    args = parse_args(argv)
    from nemo_opdlm.eval.evaluate import DecodeSettings, evaluate, format_table
    from nemo_opdlm.eval.loading import load_model
    from nemo_opdlm.eval.tasks import load_task
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime

    def settings_for(mode: str) -> DecodeSettings:
        return DecodeSettings(
            mode=mode, block_size=args.block_size, steps_per_block=args.steps_per_block, threshold=args.threshold,
            temperature=args.temperature, max_new_tokens=args.max_new_tokens, chat_template=args.chat_template,
            num_fewshot=args.num_fewshot, batch_size=args.batch_size, use_cache=not args.no_cache, seed=args.seed,
        )

    for mode in args.modes:  # bad decoding values are refused before the data and the model load
        settings_for(mode)
    if args.block_grid is not None:
        from nemo_opdlm.models.grid import resolve_grid

        resolve_grid(None, args.block_grid, "the model")  # the name alone; the model's record is checked at load
    ar_note = None
    if "ar" in args.modes:  # a block-diffusion student decoded causally: refused, or said what it measures
        from nemo_opdlm.eval.loading import causal_decoding_note

        ar_note = causal_decoding_note(args.hf, args.ckpt)
    if args.output:
        check_output(args.output)
    overrides = {k: v for k, v in (("question_field", args.question_field), ("answer_field", args.answer_field))
                 if v}
    task = load_task(args.task, args.data, split=args.split, num_fewshot=args.num_fewshot,
                     fewshot_path=args.fewshot_data, limit=args.limit, **overrides)
    with runtime(ParallelLayout(tp=args.tp, pp=args.pp)) as rt:
        loaded = load_model(rt.ctx, hf=args.hf, ckpt=args.ckpt, tokenizer=args.tokenizer, prefix=args.prefix,
                            mask_token_id=args.mask_token_id, block_grid=args.block_grid,
                            allow_grid_mismatch=args.allow_grid_mismatch)
        say = print if rt.is_main else (lambda *_: None)
        if loaded.note:
            say(loaded.note)
        if ar_note:
            say(ar_note)
        say(f"{task.name}: {len(task.examples)} examples, {len(task.fewshot)} few-shot")
        rows = []
        for mode in args.modes:
            result = evaluate(loaded.chunks, loaded.tokenizer, task, settings_for(mode), diffusion=loaded.diffusion,
                              log=say)
            say(result.summary())
            rows.append((mode, result))
        say("\n" + format_table(rows))
        if args.output and rt.is_main:
            write_output(args.output, {"model": args.hf or args.ckpt, "data": args.data,
                                       "results": [r.as_dict() for _, r in rows]})
            say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":  # torchrun -m nemo_opdlm.eval.cli ...: the same one-line errors as ``opdlm eval``
    from nemo_opdlm.errors import guarded

    sys.exit(guarded("opdlm eval", eval_main))
