"""What an exported block-diffusion student carries beside its weights and config.json.

One job: the tokenizer with the student's [MASK] registered as its mask token, a
``generation_config.json`` that describes the block decoder (block size, rounds per block,
threshold, EOS ids), and a model card (``README.md``: method, teacher, decoding, tokens per round
and the scores known at export). Called once, on rank 0, by ``mcore_to_hf.write_hf_metadata``.
Non-goals: weights and config.json (``mcore_to_hf.py``, ``hf_config.py``).

The [MASK] id rule is the trainer's (``data.prompts.check_mask_token``): an id the tokenizer already
uses must be its mask token or a reserved special token (never an ordinary word, EOS, pad or a
chat-template token, which the student would then read as masked); an id past the
tokenizer's last token becomes a new special token ``<|mask|>`` (ids between the tokenizer's end
and it are filled with reserved placeholders, so that the id is exact).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from nemo_opdlm.convert.errors import ConvertError
from nemo_opdlm.data.prompts import check_mask_token
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.config import DiffusionConfig
from nemo_opdlm.rollout.decode import DecodeConfig
from nemo_opdlm.rollout.schedules import BlockSchedule

MASK_TOKEN = "<|mask|>"
RESERVED_TOKEN = "<|opdlm_reserved_{}|>"
GENERATION_CONFIG = "generation_config.json"
MODEL_CARD = "README.md"
DEFAULT_MAX_NEW_TOKENS = 256
"""Written into generation_config.json; an explicit ``max_new_tokens`` or ``max_length`` wins."""


@dataclass
class CardFacts:
    """What the model card states beyond the config: where the student came from and how it scored."""

    checkpoint: str
    teacher: Optional[str] = None
    method: Optional[str] = None
    step: Optional[int] = None
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    """Entries of ``opdlm eval --output`` files (task, settings, accuracy, tokens_per_round, ...)."""
    rollout_tokens_per_round: Optional[float] = None
    """The training rollouts' tokens per round at ``step`` (the run's metrics.jsonl)."""
    rollout: dict[str, Any] = field(default_factory=dict)
    """How the training rollouts decoded (the run's ``rollout`` settings: mode, threshold, ...)."""


def load_tokenizer(assets_dir: Optional[str]) -> Any:
    """The source tokenizer (AutoTokenizer) of ``assets_dir``, or None when it holds none."""
    if not assets_dir or not any(os.path.isfile(os.path.join(assets_dir, n))
                                 for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets_dir)


def register_mask_token(tokenizer: Any, mask_token_id: int, source: str = "--mask-token-id",
                        token: str = MASK_TOKEN) -> str:
    """Make ``mask_token_id`` the tokenizer's mask token (see the module docstring); returns what
    was done, for the model card. Raises :class:`ConvertError` for an id that text uses
    (``data.prompts.check_mask_token``, the rule the trainer applies; ``source`` names the setting).
    ``token``: the text of a new mask token (the SDAR format's tokenizers spell it ``<|MASK|>``)."""
    size = len(tokenizer)
    if tokenizer.mask_token_id == mask_token_id:
        return f"the tokenizer's own mask token {tokenizer.mask_token!r}"
    try:  # the trainer's rule: no id that text uses (an ordinary word, EOS, pad, chat-template tokens)
        check_mask_token(mask_token_id, tokenizer, tokenizer.name_or_path or "the source", key=source)
    except ConfigError as err:
        raise ConvertError(f"{err}; the student would read that token as masked") from None
    if mask_token_id < size:
        text = tokenizer.convert_ids_to_tokens(mask_token_id)
        tokenizer.add_special_tokens({"mask_token": text})
        return f"the special token {text!r}, registered as the mask token"
    reserved = [RESERVED_TOKEN.format(i) for i in range(size, mask_token_id)]
    if reserved:
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in reserved], special_tokens=True)
    tokenizer.add_special_tokens({"mask_token": token})
    if tokenizer.mask_token_id != mask_token_id:  # pragma: no cover - the tokenizer numbered it otherwise
        raise ConvertError(f"could not register {token} at id {mask_token_id} in the tokenizer "
                           f"(it got id {tokenizer.mask_token_id})")
    note = f" ({len(reserved)} reserved placeholder(s) before it)" if reserved else ""
    return f"a new special token {token!r} at id {mask_token_id}{note}"


def eos_ids(source_config: Optional[dict], source_generation: Optional[dict], tokenizer: Any) -> list[int]:
    """The ids that end a response: the source's generation config, else its config.json, else the tokenizer."""
    for raw in ((source_generation or {}).get("eos_token_id"), (source_config or {}).get("eos_token_id"),
                getattr(tokenizer, "eos_token_id", None)):
        if raw is not None:
            return [int(i) for i in raw] if isinstance(raw, (list, tuple)) else [int(raw)]
    return []


def generation_config(diffusion: DiffusionConfig, schedule: BlockSchedule, max_new_tokens: int, eos: Sequence[int],
                      source_generation: Optional[dict], tokenizer: Any) -> dict[str, Any]:
    """generation_config.json of the student: its decoder's settings (``schedule``: block size,
    rounds per block, threshold, grid), greedy, the source's token ids.

    The source's sampling settings (an AR model's ``temperature`` / ``top_p``) are not carried over:
    they were tuned for left-to-right sampling, and the student was trained and evaluated greedy."""
    src = source_generation or {}
    pad = src.get("pad_token_id", getattr(tokenizer, "pad_token_id", None))
    out: dict[str, Any] = {
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "block_size": schedule.block_size,
        "steps_per_block": schedule.rounds_per_block,
        "threshold": schedule.threshold,
        "mask_token_id": diffusion.mask_token_id,
        "block_grid": schedule.block_grid,
        "eos_token_id": list(eos) if len(eos) != 1 else eos[0],
    }
    if src.get("bos_token_id", getattr(tokenizer, "bos_token_id", None)) is not None:
        out["bos_token_id"] = src.get("bos_token_id", getattr(tokenizer, "bos_token_id", None))
    if pad is not None:
        out["pad_token_id"] = pad
    return out


def model_card(source_architecture: str, diffusion: DiffusionConfig, gen: dict[str, Any], facts: CardFacts,
               mask_note: str, dtype: str, warning: Optional[str] = None, sections: Sequence[str] = ()) -> str:
    """README.md: what the model is, how it was made, how it decodes and how it scored.

    ``warning``: a paragraph shown first (e.g. a block-grid mismatch); ``sections``: markdown
    sections placed before the scores (e.g. the SDAR format's serve commands)."""
    teacher = f"`{facts.teacher}`" if facts.teacher else source_architecture
    method = facts.method or "opdlm"
    steps = gen["steps_per_block"]
    decoding = (f"static, {diffusion.block_size // steps if diffusion.block_size % steps == 0 else 'about ' + format(diffusion.block_size / steps, '.2f')} "
                f"token(s) per round" if gen["threshold"] is None else f"dynamic, confidence threshold {gen['threshold']}")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [block-diffusion, opdlm, nemo-opdlm]",
        "---",
        "",
        f"# Block-diffusion student of {teacher}",
        "",
        *([warning, ""] if warning else []),
        f"A block-diffusion language model converted from the autoregressive {teacher} by "
        f"{'on-policy distillation (OPDLM, arXiv 2606.06712)' if method == 'opdlm' else f'distill.method={method}'} "
        f"with nemo-opdlm{f', training step {facts.step}' if facts.step is not None else ''} "
        f"(exported from `{facts.checkpoint}`, weights in {dtype}). It keeps the teacher's architecture and tensor "
        "names; attention follows a block-diffusion mask, and `generate` decodes block by block.",
        "",
        "## Decoding (generation_config.json)",
        "",
        "| setting | value |",
        "|---|---|",
        f"| block size | {diffusion.block_size} |",
        f"| block grid | {GRID_NOTES[diffusion.block_grid]} |",
        f"| rounds per block (`steps_per_block`) | {steps} |",
        f"| threshold | {gen['threshold'] if gen['threshold'] is not None else 'none (static)'} ({decoding}) |",
        f"| [MASK] id | {diffusion.mask_token_id}: {mask_note} |",
        f"| prediction of token i read at | {'position i - 1 (shift_logits)' if diffusion.shift_logits else 'position i'} |",
        f"| EOS ids | {gen.get('eos_token_id')} |",
        "| sampling | greedy (`do_sample=True` with `temperature`, `top_k`, `top_p` to sample) |",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "batch = tok([\"...\"], return_tensors=\"pt\", padding=True)   # either padding side",
        "out = model.generate(**batch, max_new_tokens=256, threshold=0.9)  # or threshold=None: static",
        "```",
        "",
        "There is no left-to-right log-likelihood: a plain `model(input_ids)` is refused, so score it with "
        "generation tasks (`opdlm lm-eval --model opdlm --model_args hf=PATH ...`, or lm-eval's `hf` model on "
        "`generate_until` tasks).",
        "",
    ]
    for section in sections:
        lines += [section, ""]
    lines += ["## Scores known at export", ""]
    if facts.rollout_tokens_per_round is not None:
        lines += [f"Training rollouts at step {facts.step}: {facts.rollout_tokens_per_round:.2f} tokens per round.", ""]
    if not facts.eval_results:
        lines.append("None were given (`tools/export_hf.py --eval-results FILE` adds `opdlm eval --output` files).")
    else:
        lines += ["| task | examples | accuracy | tokens/round | decoding |", "|---|---|---|---|---|"]
        for r in facts.eval_results:
            s = r.get("settings") or {}
            how = s.get("mode", "?") + (f" thr={s['threshold']}" if s.get("mode") == "dynamic" else "")
            lines.append(f"| {r.get('task')} | {r.get('num_examples')} | {float(r.get('accuracy', 0)):.4f} | "
                         f"{float(r.get('tokens_per_round', 0)):.2f} | {how}, block {s.get('block_size')}, "
                         f"gen {s.get('max_new_tokens')} |")
        lines += ["", "tokens/round: valid tokens decoded per denoising round the rows needed."]
    return "\n".join(lines) + "\n"


GRID_NOTES = {
    "response": "response (blocks start at the response's first token; as trained)",
    "absolute": "absolute (blocks cut from position 0, as SGLang, lmdeploy and JetEngine serve; as trained)",
}
"""The card's statement of each ``diffusion.block_grid``."""


def trained_with(diffusion: DiffusionConfig, facts: CardFacts) -> list[str]:
    """Rows (``| setting | value |``) of the settings the student was trained with, where known."""
    rows = [f"| block size | {diffusion.block_size} |",
            f"| block grid (`diffusion.block_grid`) | {diffusion.block_grid} |",
            f"| [MASK] id | {diffusion.mask_token_id} |",
            f"| logits (`diffusion.shift_logits`) | {'shifted' if diffusion.shift_logits else 'unshifted'} |"]
    if facts.method:
        rows.append(f"| method (`distill.method`) | {facts.method} |")
    if facts.teacher:
        rows.append(f"| teacher | `{facts.teacher}` |")
    if facts.step is not None:
        rows.append(f"| training step | {facts.step} |")
    for key in ("mode", "threshold", "steps_per_block", "temperature", "static_fraction"):
        if facts.rollout.get(key) is not None:
            rows.append(f"| rollouts: `rollout.{key}` | {facts.rollout[key]} |")
    if facts.rollout_tokens_per_round is not None:
        rows.append(f"| rollouts: tokens per round at that step | {facts.rollout_tokens_per_round:.2f} |")
    return rows


def read_eval_results(paths: Sequence[str]) -> list[dict[str, Any]]:
    """The ``results`` entries of ``opdlm eval --output`` files, samples dropped."""
    out = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise ConvertError(f"--eval-results {path} cannot be read as opdlm eval's JSON output: {err}") from None
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise ConvertError(f"--eval-results {path} has no 'results' list: give a file written by opdlm eval --output")
        out += [{k: v for k, v in r.items() if k != "samples"} for r in results]
    return out


def write_student_assets(directory: str, source_architecture: str, diffusion: DiffusionConfig, *,
                         source_config: Optional[dict], assets_dir: Optional[str], decoding: DecodeConfig,
                         max_new_tokens: int, facts: CardFacts, dtype: str, mask_token: str = MASK_TOKEN,
                         card_warning: Optional[str] = None,
                         card_sections: Callable[[dict[str, Any]], Sequence[str]] = lambda gen: ()) -> list[int]:
    """Tokenizer (mask registered, as ``mask_token`` if new), generation_config.json (``decoding`` on
    this student: ``BlockSchedule.of``) and README.md into ``directory``, before its config.json is
    written; returns the EOS ids (for config.json).
    ``card_warning`` and ``card_sections(generation config)``: what the export's format adds to the
    model card (``model_card``).

    The tokenizer files are copied as they are and rewritten only to register the [MASK], so the
    tokenizer is read here exactly as a user reads it from the export (by its tokenizer_config.json,
    not by the source model's type)."""
    from nemo_opdlm.checkpoint.format import TOKENIZER_FILES

    for name in TOKENIZER_FILES:
        path = os.path.join(assets_dir, name) if assets_dir else ""
        if name != GENERATION_CONFIG and path and os.path.isfile(path):
            shutil.copy2(path, os.path.join(directory, name))
    tokenizer = load_tokenizer(directory)
    mask_note = "no tokenizer was exported"
    if tokenizer is not None:
        if tokenizer.mask_token_id == diffusion.mask_token_id:
            mask_note = f"the tokenizer's own mask token {tokenizer.mask_token!r}"
        else:
            mask_note = register_mask_token(tokenizer, diffusion.mask_token_id, token=mask_token)
            tokenizer.save_pretrained(directory)
        _name_tokenizer_class(directory, type(tokenizer).__name__)
    source_generation = None
    if assets_dir and os.path.isfile(os.path.join(assets_dir, GENERATION_CONFIG)):
        with open(os.path.join(assets_dir, GENERATION_CONFIG)) as f:
            source_generation = json.load(f)
    eos = eos_ids(source_config, source_generation, tokenizer)
    gen = generation_config(diffusion, BlockSchedule.of(diffusion, decoding), max_new_tokens, eos, source_generation,
                            tokenizer)
    with open(os.path.join(directory, GENERATION_CONFIG), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    with open(os.path.join(directory, MODEL_CARD), "w") as f:
        f.write(model_card(source_architecture, diffusion, gen, facts, mask_note, dtype, warning=card_warning,
                           sections=card_sections(gen)))
    return eos


def _name_tokenizer_class(directory: str, class_name: str) -> None:
    """tokenizer_config.json names its class: without it transformers 4.x reads config.json to find
    one, which names remote code, and asks whether to run it."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        data = json.load(f)
    if data.get("tokenizer_class"):
        return
    data["tokenizer_class"] = class_name
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
