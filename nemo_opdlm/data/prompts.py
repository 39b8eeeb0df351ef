"""Prompt datasets: files on disk -> tokenized prompts (and optional reference responses).

One job: read prompts from JSONL / JSON / Parquet files or a ``datasets`` dataset saved with
``save_to_disk``, format them with the tokenizer's chat template when it has one (else raw text),
tokenize, and drop prompts longer than a limit (the count is reported). Errors name the file, the
field and the fix. Non-goals: the order prompts are served in and the split across data-parallel
ranks (``sampler.py``).

A record's prompt field is either a string (one user turn) or a list of ``{"role", "content"}``
messages. The optional response field (off-policy KD / SFT) is tokenized without special tokens
and closed with the end-of-sequence id.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from nemo_opdlm.errors import DataError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "json", "parquet", "disk")
CHAT_TEMPLATE = ("auto", "always", "never")




@dataclass(kw_only=True)
class PromptDataConfig:
    """Where the prompts are and how to turn them into token ids."""

    path: str
    """A .jsonl / .json / .parquet file, a folder of .parquet files, or a ``save_to_disk`` folder."""
    format: str = "auto"
    """'auto' (by extension / folder contents), 'jsonl', 'json', 'parquet' or 'disk'."""
    split: str = "train"
    """Split to use when the saved dataset is a DatasetDict."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (e.g. 'prompt', 'question', 'messages')."""
    response_field: Optional[str] = None
    """Record field holding a reference response (off-policy KD / SFT); None to ignore responses."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this (after the chat template) are dropped and counted."""
    max_response_tokens: Optional[int] = None
    """Responses longer than this (with the closing EOS) drop their record; None keeps all."""
    chat_template: str = "auto"
    """'auto': use the tokenizer's chat template when it has one; 'always' (error without one); 'never'."""
    system_prompt: Optional[str] = None
    """A system message placed before string prompts when the chat template is used."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra template variables, e.g. ``{"enable_thinking": False}`` for Qwen3."""
    domain_field: Optional[str] = None
    """Record field naming each prompt's domain (e.g. 'math', 'code'), for
    ``rollout.max_length_by_domain``; None: prompts carry no domain."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        if self.chat_template not in CHAT_TEMPLATE:
            raise DataError(f"data.chat_template must be one of {CHAT_TEMPLATE}, got {self.chat_template!r}")
        if self.max_prompt_tokens < 1:
            raise DataError(f"data.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            raise DataError(f"data.max_response_tokens must be >= 1 or None, got {self.max_response_tokens}")
        if not self.prompt_field:
            raise DataError("data.prompt_field must name a record field, e.g. 'prompt' or 'question'")


@dataclass(frozen=True)
class Example:
    """One usable record: its row in the source, prompt ids and optional response ids."""

    index: int
    prompt_ids: list[int]
    response_ids: Optional[list[int]] = None
    domain: Optional[str] = None


@dataclass(frozen=True)
class PromptSet:
    """The usable records of a dataset, with what was dropped and why."""

    examples: list[Example]
    num_records: int
    num_prompt_too_long: int
    num_response_too_long: int = 0

    def __len__(self) -> int:
        return len(self.examples)


# --- reading ---------------------------------------------------------------------------------

def _detect_format(path: str) -> str:
    if os.path.isdir(path):
        names = os.listdir(path)
        if any(n in names for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "disk"
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        raise DataError(f"{path} is a folder with neither a saved `datasets` dataset nor .parquet files")
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet")):
        if path.endswith(ext):
            return fmt
    raise DataError(f"cannot tell the format of {path} from its name: set data.format to one of {FORMATS[1:]}")


def _read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    return records


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)  # a .json file with one object per line
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return list(data)


def _read_parquet(path: str, columns: Sequence[str]) -> list[dict]:
    import pyarrow.parquet as pq

    files = ([os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".parquet")]
             if os.path.isdir(path) else [path])
    records: list[dict] = []
    for file in files:
        schema = pq.read_schema(file)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise DataError(f"{file}: no field {missing[0]!r}; fields are {schema.names}")
        records.extend(pq.read_table(file, columns=list(columns)).to_pylist())
    return records


def _read_disk(path: str, split: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; splits are {sorted(ds)} (set data.split)")
        ds = ds[split]
    return ds.to_list()


def read_records(cfg: PromptDataConfig) -> list[dict]:
    """All records of ``cfg.path`` as dicts (only the configured fields are guaranteed)."""
    if not os.path.exists(cfg.path):
        raise DataError(f"data.path {cfg.path} does not exist")
    fmt = _detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    fields = [cfg.prompt_field] + ([cfg.response_field] if cfg.response_field else [])
    if fmt == "jsonl":
        records = _read_jsonl(cfg.path)
    elif fmt == "json":
        records = _read_json(cfg.path)
    elif fmt == "parquet":
        records = _read_parquet(cfg.path, fields)
    else:
        records = _read_disk(cfg.path, cfg.split)
    if not records:
        raise DataError(f"data.path {cfg.path} holds no records")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{cfg.path}: record {i} is a {type(rec).__name__}, not an object")
        for name in fields:
            if rec.get(name) is None:
                where = "" if i == 0 else f" (record {i})"
                raise DataError(f"{cfg.path}: no field {name!r}{where}; fields are {sorted(rec)} "
                                f"(set data.{'prompt' if name == cfg.prompt_field else 'response'}_field)")
    return records


# --- encoding --------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(prompt: Any, tokenizer, cfg: PromptDataConfig) -> tuple[str, bool]:
    """``(text, templated)``: the chat-formatted prompt (with the generation prompt) or raw text."""
    use_chat = cfg.chat_template == "always" or (cfg.chat_template == "auto" and has_chat_template(tokenizer))
    if use_chat and not has_chat_template(tokenizer):
        raise DataError("data.chat_template='always' but the tokenizer has no chat template")
    if isinstance(prompt, str):
        if not use_chat:
            return prompt, False
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if not use_chat:
            raise DataError("prompts given as chat messages need a tokenizer with a chat template "
                            "(and data.chat_template != 'never')")
        messages = prompt
    else:
        raise DataError(f"a prompt must be a string or a list of {{role, content}} messages, "
                        f"got {type(prompt).__name__}")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **cfg.chat_template_kwargs)
    return text, True


def encode_prompts(prompts: Sequence[Any], tokenizer, cfg: PromptDataConfig) -> list[list[int]]:
    """Token ids per prompt. Templated text carries its own special tokens; raw text gets the
    tokenizer's (e.g. a BOS)."""
    texts = [prompt_text(p, tokenizer, cfg) for p in prompts]
    out: list[list[int]] = [[] for _ in texts]
    for templated in (True, False):
        idx = [i for i, (_, t) in enumerate(texts) if t == templated]
        if idx:
            enc = tokenizer([texts[i][0] for i in idx], add_special_tokens=not templated)["input_ids"]
            for i, ids in zip(idx, enc):
                out[i] = list(ids)
    return out


def encode_responses(responses: Sequence[str], tokenizer, eos_id: Optional[int]) -> list[list[int]]:
    """Response ids (no special tokens), each closed with ``eos_id``."""
    if eos_id is None:
        raise DataError("responses need an end-of-sequence id: the tokenizer has no eos_token "
                        "(pass eos_id)")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(f"response {i} is a {type(r).__name__}, not a string")
    enc = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [list(ids) + [eos_id] for ids in enc]


def load_prompts(cfg: PromptDataConfig, tokenizer, eos_id: Optional[int] = None) -> PromptSet:
    """Read, format, tokenize and filter the dataset of ``cfg``.

    ``eos_id`` closes reference responses (default: the tokenizer's ``eos_token_id``).
    """
    records = read_records(cfg)
    prompt_ids = encode_prompts([r[cfg.prompt_field] for r in records], tokenizer, cfg)
    response_ids: list[Optional[list[int]]] = [None] * len(records)
    if cfg.response_field:
        eos = tokenizer.eos_token_id if eos_id is None else eos_id
        response_ids = encode_responses([r[cfg.response_field] for r in records], tokenizer, eos)
    domains: list[Optional[str]] = [None] * len(records)
    if cfg.domain_field:
        missing = next((i for i, r in enumerate(records) if r.get(cfg.domain_field) is None), None)
        if missing is not None:
            raise DataError(f"{cfg.path}: record {missing} has no field {cfg.domain_field!r} (data.domain_field); "
                            f"fields are {sorted(records[missing])}")
        domains = [str(r[cfg.domain_field]) for r in records]
    examples, too_long, resp_too_long = [], 0, 0
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p:
            raise DataError(f"{cfg.path}: record {i} has an empty prompt")
        if len(p) > cfg.max_prompt_tokens:
            too_long += 1
        elif r is not None and cfg.max_response_tokens is not None and len(r) > cfg.max_response_tokens:
            resp_too_long += 1
        else:
            examples.append(Example(i, p, r, domains[i]))
    if too_long or resp_too_long:
        logger.warning("%s: dropped %d of %d prompts longer than %d tokens%s", cfg.path, too_long,
                       len(records), cfg.max_prompt_tokens,
                       f" and {resp_too_long} responses longer than {cfg.max_response_tokens}"
                       if resp_too_long else "")
    if not examples:
        raise DataError(f"{cfg.path}: all {len(records)} records were dropped (prompts longer than "
                        f"data.max_prompt_tokens={cfg.max_prompt_tokens} or responses longer than "
                        f"data.max_response_tokens={cfg.max_response_tokens})")
    return PromptSet(examples, len(records), too_long, resp_too_long)


# --- batching --------------------------------------------------------------------------------

END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


def eos_ids(tokenizer, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The tokenizer's EOS plus the usual end-of-turn tokens it knows, plus ``extra`` (no duplicates)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab]
    ids += [int(i) for i in extra]
    return tuple(dict.fromkeys(ids))


def default_pad(eos: Sequence[int]) -> int:
    """The pad id when nothing names one: the first EOS id (padding after a response's end reads
    as more end), else 0."""
    return int(eos[0]) if len(eos) else 0


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else :func:`default_pad` of its EOS ids."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else default_pad(eos_ids(tokenizer))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int,
             width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, W] left-padded, lengths [B])``; W = the longest sequence unless given."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    longest = int(lens.max()) if len(seqs) else 0
    width = longest if width is None else width
    if longest > width:
        raise ValueError(f"a sequence of {int(lens.max())} tokens does not fit width {width}")
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
    return ids, lens


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int,
              width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, W] right-padded, lengths [B])``; sequences longer than ``width`` are cut."""
    width = max(len(s) for s in seqs) if width is None else width
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lens = torch.tensor([min(len(s), width) for s in seqs], dtype=torch.long)
    for row, s in enumerate(seqs):
        n = int(lens[row])
        if n:
            ids[row, :n] = torch.tensor(list(s)[:n], dtype=torch.long)
    return ids, lens
