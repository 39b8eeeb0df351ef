"""The recipe against the checkpoints, tokenizers and data on this machine (only what is here).

One job: findings, never exceptions: an architecture that differs from the recipe's, a tokenizer
larger than the embedding, a [MASK] id the tokenizer produces, teacher and student tokenizers that
differ, missing paths (notes here, errors inside the job with ``--require-paths``).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional

from nemo_opdlm.errors import ConfigError
from nemo_opdlm.plan.layout import Finding

if TYPE_CHECKING:  # annotations only: models.config imports torch, which `opdlm plan --help` must not wait for
    from nemo_opdlm.models.config import ModelConfig


def compare_architecture(expected: ModelConfig, found: ModelConfig, what: str, source: str) -> list[Finding]:
    """An error naming every architecture field where the checkpoint and the recipe disagree
    (``models.describe.architecture_differences``: the trainer's own check, the same wording)."""
    from nemo_opdlm.models.describe import architecture_differences

    diffs = architecture_differences(expected, found)
    if diffs:
        return [Finding("error", f"{what} does not match {source}: " + "; ".join(diffs)
                        + " (wrong checkpoint for this recipe, or fix the recipe's shape)")]
    return [Finding("ok", f"{what} matches {source}")]


def _tokenizer_json(path: Optional[str]) -> Optional[dict[str, Any]]:
    if not path:
        return None
    for candidate in (os.path.join(path, "tokenizer.json"), os.path.join(path, "hf_assets", "tokenizer.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    return None


def _token_table(tok: dict[str, Any]) -> tuple[dict[int, str], set[int]]:
    """id -> token text, and the ids of added tokens (specials and user-added)."""
    vocab = (tok.get("model") or {}).get("vocab")
    table: dict[int, str] = {}
    if isinstance(vocab, dict):
        table = {int(i): t for t, i in vocab.items()}
    elif isinstance(vocab, list):  # unigram: [[piece, score], ...]
        table = {i: piece[0] for i, piece in enumerate(vocab)}
    added = {int(t["id"]) for t in tok.get("added_tokens", [])}
    for t in tok.get("added_tokens", []):
        table[int(t["id"])] = t["content"]
    return table, added


def check_tokenizers(cfg) -> list[Finding]:
    """Tokenizer vs embedding, [MASK] id vs real tokens, and teacher tokenizer == student tokenizer."""
    init = cfg.init
    teacher_dir = init.tokenizer or init.teacher_hf or init.teacher_checkpoint
    teacher_tok = _tokenizer_json(teacher_dir)
    if teacher_tok is None:
        return [Finding("note", f"no tokenizer.json at {teacher_dir}: tokenizer checks skipped")]
    table, added = _token_table(teacher_tok)
    size = max(table) + 1 if table else 0
    findings: list[Finding] = []
    for what, model in (("model", cfg.model), ("teacher_model", cfg.teacher)):
        if size > model.vocab_size:
            findings.append(Finding("error", f"the tokenizer in {teacher_dir} has ids up to {size - 1} but "
                                             f"{what}.vocab_size={model.vocab_size}: tokenizer and model differ"))
    mask = cfg.diffusion.mask_token_id
    if mask in table and mask not in added:
        findings.append(Finding("error", f"diffusion.mask_token_id={mask} is the ordinary token {table[mask]!r}: "
                                         f"pick an id the tokenizer never produces (>= {size} and < "
                                         f"{cfg.model.vocab_size}) or a reserved special token"))
    elif mask in table:
        findings.append(Finding("ok", f"[MASK] id {mask} is the special token {table[mask]!r}"))
    else:
        findings.append(Finding("ok", f"[MASK] id {mask} is an embedding row no token maps to "
                                      f"(tokenizer: {size} ids, embedding: {cfg.model.vocab_size})"))
    student_tok = _tokenizer_json(init.student_hf)
    if student_tok is not None:
        s_table, s_added = _token_table(student_tok)
        differ = sorted(i for i in set(table) | set(s_table) if table.get(i) != s_table.get(i))
        if differ:
            i = differ[0]
            findings.append(Finding("error", f"teacher and student tokenizers differ at {len(differ)} ids (first: "
                                             f"{i}: {table.get(i)!r} vs {s_table.get(i)!r}): the KL needs one "
                                             "vocabulary; use a student from the teacher's family"))
        else:
            findings.append(Finding("ok", "teacher and student tokenizers are identical"))
    return findings


def check_checkpoints(cfg, require_paths: bool = False) -> list[Finding]:
    """Compare the recipe with the checkpoints and data on this machine; skip (or refuse) what is absent."""
    from nemo_opdlm.convert.architecture import model_config_of_weights

    init = cfg.init
    findings: list[Finding] = []
    missing = "error" if require_paths else "note"
    sources = [("teacher", cfg.teacher, init.teacher_checkpoint or init.teacher_hf)]
    if init.student_hf:
        sources.append(("student", cfg.model, init.student_hf))
    for what, model, path in sources:
        if not path:
            findings.append(Finding(missing, f"no {what} checkpoint configured (init.{what}_hf): random weights"))
            continue
        if not os.path.exists(path):
            findings.append(Finding(missing, f"{what} checkpoint {path} not found here: its config checks skipped"))
            continue
        try:  # only the architecture is compared: Transformer Engine may be absent here
            found = model_config_of_weights(path, f"init.{what}", linear_impl="local", fp8=None)
        except ConfigError as err:
            findings.append(Finding("error", str(err)))
            continue
        findings += compare_architecture(model, found, f"the recipe's {what}", path)
    if any(os.path.exists(p) for p in (init.tokenizer, init.teacher_hf, init.teacher_checkpoint) if p):
        findings += check_tokenizers(cfg)
    if cfg.data is not None:
        if os.path.exists(cfg.data.path):
            findings.append(Finding("ok", f"data {cfg.data.path} exists"))
        else:
            findings.append(Finding(missing, f"data.path {cfg.data.path} not found here"))
    return findings
