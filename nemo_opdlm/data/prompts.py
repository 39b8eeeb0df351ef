"""Prompt datasets: files on disk -> tokenized prompts (and optional reference responses).

One job: read prompts from JSONL / JSON / Parquet files or a ``datasets`` dataset saved with
``save_to_disk``, format them with the tokenizer's chat template when it has one (else raw text),
tokenize, and drop records that cannot be used as they are, reporting how many and where (file and
line): prompts longer than ``max_prompt_tokens``, responses longer than ``max_response_tokens``, and
text the tokenizer cannot represent (it encodes to the tokenizer's unknown token, e.g. ``[UNK]``:
training on it would teach the student a placeholder for what the user wrote; byte-level tokenizers
such as Qwen's and Llama 3's have none). Errors name the file, the line (JSONL; else the record),
the field and the fix. Non-goals: the order prompts are served in and the split across
data-parallel ranks (``sampler.py``).

Cost: a prompt with more than ``MAX_CHARS_PER_TOKEN`` characters per allowed token is counted too
long without being tokenized, so one huge line costs its JSON parse, not a tokenization (a 5 MB
one-line prompt took 38 s and 2.45 GB before it was dropped).

A record's prompt field is either a string (one user turn) or a list of ``{"role", "content"}``
messages, cut before the first assistant turn. The optional response field (off-policy KD / SFT)
is a string or such messages (their first assistant turn: ``prompt_field=response_field=messages``
trains on a chat dataset's own answers); it is tokenized without special tokens and closed with the
end-of-sequence id. ``prompt_template`` writes prompts as evaluation does.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from nemo_opdlm.data.formats import FORMATS as TASK_FORMATS
from nemo_opdlm.errors import ConfigError, DataError  # noqa: F401  (DataError re-exported)

if TYPE_CHECKING:  # torch only where rows are built: reading and checking data (and --help) need none
    import torch

logger = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "json", "csv", "parquet", "disk")
CHAT_TEMPLATE = ("auto", "always", "never")
MAX_CHARS_PER_TOKEN = 64
"""A text longer than this many characters per allowed token is too long without tokenizing it: no
subword tokenizer averages 64 characters a token over a prompt (English BPE averages about 4)."""



@dataclass(kw_only=True)
class PromptDataConfig:
    """Where the prompts are and how to turn them into token ids."""

    path: str
    """A .jsonl / .json / .csv / .parquet file (.gz, .bz2, .xz, .zst compressed too), a glob of them
    (``shards/train-*.jsonl.gz``), a folder of them, or a ``save_to_disk`` folder; read by
    ``datasets.load_dataset`` (``load_from_disk``)."""
    format: str = "auto"
    """'auto' (by extension / folder contents), 'jsonl', 'json', 'csv', 'parquet' or 'disk'."""
    split: str = "train"
    """Split to use when the saved dataset is a DatasetDict."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (e.g. 'prompt', 'question', 'messages')."""
    response_field: Optional[str] = None
    """Record field holding a reference response (off-policy KD / SFT): a string, or chat messages
    whose first assistant turn after the prompt is the response (``messages``, the same field as the
    prompt's); None to ignore responses."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this (after the chat template) are dropped and counted (with the line of
    the first ones); prompts the tokenizer can only encode with its unknown token are too."""
    max_response_tokens: Optional[int] = None
    """Responses longer than this (with the closing EOS) drop their record; None keeps all."""
    chat_template: str = "auto"
    """'auto': use the tokenizer's chat template when it has one; 'always' (error without one); 'never'."""
    system_prompt: Optional[str] = None
    """A system message placed before string prompts when the chat template is used."""
    prompt_template: Optional[str] = None
    """How each prompt's text is written before the chat template, so that training prompts match the
    evaluation's: a text holding ``{prompt}`` (e.g. ``"{prompt}\nPlease reason step by step."``), or
    the name of an ``opdlm eval`` task format (``gsm8k``, ``math``, ...) to write them as
    ``opdlm eval --task NAME`` does: its instruction appended under the chat template, its raw-text
    template without one. With chat messages, the last user turn is written so. None: as is."""
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
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            if self.prompt_template not in TASK_FORMATS:
                raise DataError(f"data.prompt_template must hold '{{prompt}}' or name an eval task format "
                                f"({', '.join(sorted(TASK_FORMATS))}), got {self.prompt_template!r}")


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
    num_unknown_tokens: int = 0
    """Records whose prompt or response encodes to the tokenizer's unknown token (dropped)."""

    def __len__(self) -> int:
        return len(self.examples)


# --- reading ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Records:
    """A dataset's records, and where each came from (for errors and drop reports)."""

    path: str
    rows: list[dict]
    lines: Optional[list[int]] = None
    """The JSONL line of each record (None for formats without lines)."""

    def where(self, i: int) -> str:
        """``file:line`` of record ``i`` (JSONL), else ``file (record i)``."""
        return f"{self.path}:{self.lines[i]}" if self.lines is not None else f"{self.path} ({self.place(i)})"

    def place(self, i: int) -> str:
        """``line N`` (JSONL) or ``record i``."""
        return f"line {self.lines[i]}" if self.lines is not None else f"record {i}"


COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")
EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File extensions (before a compression suffix) -> the ``datasets`` builder that reads them."""
BUILDERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}
"""``data.format`` -> builder."""


def _extension(name: str) -> str:
    """``.jsonl`` of ``a.jsonl.gz``: the extension that says the format, past a compression suffix."""
    base = name
    for comp in COMPRESSION:
        if base.endswith(comp):
            base = base[: -len(comp)]
            break
    return os.path.splitext(base)[1]


def _files(path: str) -> list[str]:
    """The files of ``data.path``: one file, a glob (``shards/train-*.jsonl.gz``), or a folder's
    Parquet shards (a folder holds more than data: JSON shards are named by a glob)."""
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataError(f"data.path {path} matches no files")
        return files
    if os.path.isdir(path):
        return sorted(os.path.join(path, n) for n in os.listdir(path) if _extension(n) == ".parquet")
    return [path]


def _detect_format(path: str) -> str:
    if os.path.isdir(path):
        names = os.listdir(path)
        if any(n in names for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "disk"
    kinds = sorted({EXTENSIONS.get(_extension(f)) for f in _files(path)} - {None})
    if len(kinds) == 1:
        return kinds[0]
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder with neither a saved `datasets` dataset nor .parquet files (JSON "
                        f"or CSV shards: give a glob, e.g. {os.path.join(path, '*.jsonl')})")
    if len(kinds) > 1:
        raise DataError(f"data.path {path} matches files of several formats ({', '.join(kinds)}): narrow the glob")
    raise DataError(f"cannot tell the format of {path} from its name: set data.format to one of {FORMATS[1:]}")


def _not_utf8(where: str, data: bytes, err: UnicodeDecodeError, line_start: int = 0) -> DataError:
    return DataError(f"{where}: not UTF-8 text (byte 0x{data[err.start:err.start + 1].hex()} at column "
                     f"{err.start - line_start + 1}): re-encode the file as UTF-8")


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as err:
        raise DataError(f"data.path {path} cannot be read ({err.strerror or err})") from None


def _read_jsonl(path: str) -> tuple[list[dict], list[int]]:
    """Records and their line numbers; each line is decoded on its own, so a bad byte names its line."""
    records, lines = [], []
    with _open(path) as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(f"{path}:{line_no}", raw, err) from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            lines.append(line_no)
    return records, lines


def _read_json(path: str) -> tuple[list[dict], Optional[list[int]]]:
    with _open(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise _not_utf8(f"{path}:{line}", raw, err, raw.rfind(b"\n", 0, err.start) + 1) from None
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)  # a .json file with one object per line
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    return data, None


def read_parquet(path: str, columns: Optional[Sequence[str]] = None) -> list[dict]:
    """The rows of Parquet files (a file, a folder of them or a glob; ``columns``: those only, each
    required; None: all), read by ``datasets``. A file that is not Parquet is named, with the format
    it looks like."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _files(path)
    for file in files:
        try:
            schema = pq.read_schema(file)
        except (pa.ArrowException, OSError) as err:
            hint = ("; it looks like JSON lines: set data.format=jsonl (or auto)"
                    if file.endswith((".jsonl", ".json")) else "")
            raise DataError(f"{file}: not a Parquet file ({str(err).splitlines()[0]}){hint}") from None
        missing = [c for c in columns or () if c not in schema.names]
        if missing:
            raise DataError(f"{file}: no field {missing[0]!r}; fields are {schema.names}")
    return _load("parquet", files, path, columns=None if columns is None else list(columns)).to_list()


def _load(builder: str, files: list[str], path: str, **kwargs: Any):
    """``datasets.load_dataset(builder, data_files=files)``'s one split (cached where ``datasets``
    caches: ``HF_DATASETS_CACHE``)."""
    import datasets

    quiet = logging.getLogger("datasets")  # its parse errors are logged too: ours name the line instead
    level, bars = quiet.level, datasets.is_progress_bar_enabled()
    quiet.setLevel(logging.CRITICAL + 1)
    datasets.disable_progress_bars()  # no per-file progress bars on every rank
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    finally:
        quiet.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _read_files(builder: str, path: str) -> tuple[list[dict], Optional[list[int]]]:
    """The records of JSON / JSON-lines / CSV files (compressed or not, one or many), read by
    ``datasets``; a single plain JSON-lines file also gives each record's line. Where ``datasets``
    cannot read a JSON file (bad JSON, bytes that are not UTF-8, a field whose type changes between
    records) the file is read line by line: its errors name the line, and records whose fields mix
    types (a string prompt here, chat messages there) are still served."""
    files = _files(path)
    plain_json = builder == "json" and len(files) == 1 and not files[0].endswith(COMPRESSION)
    for file in files:
        if not os.access(file, os.R_OK):
            raise DataError(f"data.path {file} cannot be read (permission denied)")
    if plain_json and not _first_record_is_object(files[0]):
        # datasets would make up a field 'text' for records that are not objects: read them as they are
        return _read_jsonl(files[0]) if _extension(files[0]) == ".jsonl" else _read_json(files[0])
    try:
        rows = _load(builder, files, path).to_list()
    except Exception as err:  # noqa: BLE001  (datasets wraps parser errors in several types)
        if plain_json:
            return _read_json(files[0])
        raise DataError(f"{path}: {builder} files that datasets cannot read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); check the files' format") from None
    lines = _record_lines(files[0], len(rows)) if plain_json else None
    return rows, lines


def _first_record_is_object(path: str) -> bool:
    """The first record of a plain JSON / JSON-lines file starts as an object (``{``): checked on its
    first bytes, since ``datasets`` reads an array or lines of numbers as records of a field 'text'."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # a JSON array: its first element; or a JSON-lines record that is a list
        head = head[1:].lstrip()
    return not head or head.startswith((b"{", b"]"))


def _kind(value: Any) -> str:
    """A JSON value's kind as a user names it (``a number``, ``a list``), with the value, for errors."""
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    shown = repr(value)
    return f"{names.get(type(value), 'a ' + type(value).__name__)} ({shown[:40] + '...' if len(shown) > 40 else shown})"


def _check_record(records: "Records", i: int, fields: Sequence[str], cfg: PromptDataConfig) -> None:
    """Record ``i`` is an object holding every configured field with a value: a record that is not
    an object, a missing field and a null / NaN one are three different mistakes, each named."""
    rec = records.rows[i]
    if not isinstance(rec, dict):
        raise DataError(f"{records.where(i)}: the record is {_kind(rec)}, not an object: each record must be a JSON "
                        f"object with the field {cfg.prompt_field!r} (data.prompt_field)")
    for name in fields:
        key = f"data.{'prompt' if name == cfg.prompt_field else 'response'}_field"
        value = rec.get(name)
        if name not in rec:
            where = cfg.path if i == 0 else records.where(i)
            raise DataError(f"{where}: no field {name!r}; fields are {sorted(rec)} (set {key})")
        if value is None or (isinstance(value, float) and value != value):
            what = "NaN" if value is not None else "null or NaN"
            raise DataError(f"{records.where(i)}: the field {name!r} ({key}) is {what}, not a string: give it text, "
                            "or remove the record")


def _record_lines(path: str, count: int) -> Optional[list[int]]:
    """The line of each record of a JSON-lines file (its non-blank lines), or None for a JSON array."""
    with open(path, "rb") as f:
        lines = [n for n, raw in enumerate(f, 1) if raw.strip()]
    return lines if len(lines) == count else None


def _read_disk(path: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; splits are {sorted(ds)} (set data.split)")
        ds = ds[split]
    return ds.to_list()


def read_dataset(cfg: PromptDataConfig, all_columns: bool = False) -> Records:
    """All records of ``cfg.path`` with their locations; every configured field is present.
    ``all_columns``: Parquet files are read whole (default: the configured fields only)."""
    if not os.path.exists(cfg.path) and not any(c in cfg.path for c in "*?["):
        raise DataError(f"data.path {cfg.path} does not exist")
    fmt = _detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    fields = list(dict.fromkeys([cfg.prompt_field] + ([cfg.response_field] if cfg.response_field else [])))
    if fmt in ("jsonl", "json", "csv") and os.path.isdir(cfg.path):
        raise DataError(f"data.path {cfg.path} is a folder, not a {fmt} file (data.format={cfg.format})")
    lines: Optional[list[int]] = None
    if fmt == "parquet":
        rows = read_parquet(cfg.path, None if all_columns else fields)
    elif fmt == "disk":
        rows = _read_disk(cfg.path, cfg.split)
    else:
        rows, lines = _read_files(BUILDERS[fmt], cfg.path)
    if not rows:
        raise DataError(f"data.path {cfg.path} holds no records")
    records = Records(cfg.path, rows, lines)
    for i in range(len(rows)):
        _check_record(records, i, fields, cfg)
    return records


def read_records(cfg: PromptDataConfig, all_columns: bool = False) -> list[dict]:
    """All records of ``cfg.path`` as dicts (only the configured fields are guaranteed)."""
    return read_dataset(cfg, all_columns).rows


# --- encoding --------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


CHAT_TEMPLATE_MODES = ("auto", "always", "never")


def use_chat_template(tokenizer, mode: str, key: str) -> bool:
    """Whether prompts go through the tokenizer's chat template: 'always', 'never', or 'auto' (when it
    has one). ``key`` names the setting in errors (``data.chat_template``, ``--chat-template``)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise DataError(f"{key} must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    if mode == "always" and not has_chat_template(tokenizer):
        raise DataError(f"{key}='always' but the tokenizer has no chat template")
    return mode == "always" or (mode == "auto" and has_chat_template(tokenizer))


def is_messages(value: Any) -> bool:
    """A chat conversation: a non-empty list of ``{role, content}`` dicts."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _turns(messages: list[dict]) -> list[dict]:
    """The messages with the keys a columnar reader filled in for other records (None) left out."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _first_assistant(messages: list[dict]) -> int:
    """The index of the first assistant turn (``len(messages)`` without one)."""
    return next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))


def prompt_messages(messages: list[dict], where: str = "") -> list[dict]:
    """A conversation's prompt: the turns before its first assistant turn (the model answers there;
    later turns would put the answer into the prompt)."""
    cut = _first_assistant(messages)
    if cut == 0:
        raise DataError(f"{where + ': ' if where else ''}the conversation starts with an assistant turn: "
                        "there is no prompt before it")
    return _turns(messages[:cut])


def response_text(value: Any, field_name: str, where: str) -> str:
    """A record's reference response: the string, or the first assistant turn of chat messages."""
    if isinstance(value, str):
        return value
    if is_messages(value):
        cut = _first_assistant(value)
        if cut == len(value) or not isinstance(value[cut].get("content"), str):
            raise DataError(f"{where}: the conversation in {field_name!r} has no assistant turn with text to "
                            "learn as the response")
        return value[cut]["content"]
    raise DataError(f"{where}: the response ({field_name!r}) is a {type(value).__name__}, not a string or "
                    "chat messages with an assistant turn")


def apply_prompt_template(text: str, template: Optional[str], chat: bool) -> str:
    """``text`` written as ``data.prompt_template`` says (see there)."""
    if template is None:
        return text
    if "{prompt}" in template:
        return template.replace("{prompt}", text)
    fmt = TASK_FORMATS[template]
    return text + fmt.instruction if chat else fmt.template.format(question=text)


def prompt_text(prompt: Any, tokenizer, cfg: PromptDataConfig, where: str = "") -> tuple[str, bool]:
    """``(text, templated)``: the chat-formatted prompt (with the generation prompt) or raw text. Chat
    messages end before their first assistant turn."""
    use_chat = use_chat_template(tokenizer, cfg.chat_template, "data.chat_template")
    if isinstance(prompt, str):
        prompt = apply_prompt_template(prompt, cfg.prompt_template, use_chat)
        if not use_chat:
            return prompt, False
        messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else [])
        messages.append({"role": "user", "content": prompt})
    elif is_messages(prompt):
        if not use_chat:
            raise DataError("prompts given as chat messages need a tokenizer with a chat template "
                            "(and data.chat_template != 'never')")
        messages = prompt_messages(prompt, where)
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
        if cfg.prompt_template is not None and last_user is not None:
            content = apply_prompt_template(str(messages[last_user].get("content", "")), cfg.prompt_template, True)
            messages[last_user] = {**messages[last_user], "content": content}
    else:
        raise DataError(f"{where + ': ' if where else ''}a prompt must be a string or a list of {{role, content}} "
                        f"messages, got {type(prompt).__name__}")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **cfg.chat_template_kwargs)
    return text, True


def encode_texts(texts: Sequence[tuple[str, bool]], tokenizer) -> list[list[int]]:
    """Token ids of ``(text, templated)`` pairs. Templated text carries its own special tokens; raw
    text gets the tokenizer's (e.g. a BOS)."""
    out: list[list[int]] = [[] for _ in texts]
    for templated in (True, False):
        idx = [i for i, (_, t) in enumerate(texts) if t == templated]
        if idx:
            enc = tokenizer([texts[i][0] for i in idx], add_special_tokens=not templated)["input_ids"]
            for i, ids in zip(idx, enc):
                out[i] = list(ids)
    return out


def encode_prompts(prompts: Sequence[Any], tokenizer, cfg: PromptDataConfig) -> list[list[int]]:
    """Token ids per prompt (chat-formatted when ``cfg`` says so)."""
    return encode_texts([prompt_text(p, tokenizer, cfg) for p in prompts], tokenizer)


def encode_responses(responses: Sequence[str], tokenizer, eos_id: Optional[int]) -> list[list[int]]:
    """Response ids (no special tokens), each closed with ``eos_id``."""
    if eos_id is None:
        raise DataError("responses need an end-of-sequence id: the tokenizer has no eos_token "
                        "(pass eos_id)")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(f"response {i} is a {type(r).__name__}, not a string")
    if not responses:
        return []
    enc = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    return [list(ids) + [eos_id] for ids in enc]


def _first(records: Records, indices: Sequence[int], n: int = 3) -> str:
    """Where the first ``n`` of ``indices`` are, for a drop report: ``line 3, line 9, ...``."""
    return ", ".join(records.place(i) for i in indices[:n]) + (", ..." if len(indices) > n else "")


def _encode_prompts(records: Records, tokenizer, cfg: PromptDataConfig) -> tuple[dict[int, list[int]], list[int]]:
    """``(ids of the prompts that fit, indices of those that do not)``; a text over
    ``MAX_CHARS_PER_TOKEN`` characters per allowed token is not tokenized at all."""
    texts = [prompt_text(r[cfg.prompt_field], tokenizer, cfg, records.where(i)) for i, r in enumerate(records.rows)]
    limit = cfg.max_prompt_tokens * MAX_CHARS_PER_TOKEN
    short = [i for i, (text, _) in enumerate(texts) if len(text) <= limit]
    ids = dict(zip(short, encode_texts([texts[i] for i in short], tokenizer)))
    for i in short:
        if not ids[i]:
            raise DataError(f"{records.where(i)}: the prompt is empty")
    too_long = [i for i in range(len(texts)) if i not in ids or len(ids[i]) > cfg.max_prompt_tokens]
    return {i: v for i, v in ids.items() if len(v) <= cfg.max_prompt_tokens}, too_long


def _encode_responses(records: Records, indices: Sequence[int], tokenizer, cfg: PromptDataConfig,
                      eos_id: Optional[int]) -> tuple[dict[int, list[int]], list[int]]:
    """``(ids of the responses of ``indices`` that fit, indices of those that do not)``."""
    field_ = cfg.response_field
    texts = {i: response_text(records.rows[i][field_], field_, records.where(i)) for i in indices}
    most = cfg.max_response_tokens
    short = [i for i in indices if most is None or len(texts[i]) <= most * MAX_CHARS_PER_TOKEN]
    ids = dict(zip(short, encode_responses([texts[i] for i in short], tokenizer, eos_id)))
    too_long = [i for i in indices if i not in ids or (most is not None and len(ids[i]) > most)]
    return {i: v for i, v in ids.items() if most is None or len(v) <= most}, too_long


def load_prompts(cfg: PromptDataConfig, tokenizer, eos_id: Optional[int] = None) -> PromptSet:
    """Read, format, tokenize and filter the dataset of ``cfg``.

    ``eos_id`` closes reference responses (default: the tokenizer's ``eos_token_id``). Records are
    dropped, counted and located (the first few lines are logged) when the prompt is longer than
    ``max_prompt_tokens``, the response longer than ``max_response_tokens``, or either holds text
    the tokenizer can only encode as its unknown token.
    """
    records = read_dataset(cfg)
    n = len(records.rows)
    domains: list[Optional[str]] = [None] * n
    if cfg.domain_field:
        missing = next((i for i, r in enumerate(records.rows) if r.get(cfg.domain_field) is None), None)
        if missing is not None:
            raise DataError(f"{cfg.path}: record {missing} has no field {cfg.domain_field!r} (data.domain_field); "
                            f"fields are {sorted(records.rows[missing])}")
        domains = [str(r[cfg.domain_field]) for r in records.rows]
    prompt_ids, too_long = _encode_prompts(records, tokenizer, cfg)
    response_ids: dict[int, list[int]] = {}
    resp_too_long: list[int] = []
    if cfg.response_field:
        eos = tokenizer.eos_token_id if eos_id is None else eos_id
        response_ids, resp_too_long = _encode_responses(records, sorted(prompt_ids), tokenizer, cfg, eos)
    kept = [i for i in sorted(prompt_ids) if not cfg.response_field or i in response_ids]
    unk = tokenizer.unk_token_id
    unknown = [i for i in kept if unk is not None and (unk in prompt_ids[i] or unk in response_ids.get(i, ()))]
    examples = [Example(i, prompt_ids[i], response_ids.get(i), domains[i]) for i in kept if i not in set(unknown)]
    if too_long:
        logger.warning("%s: dropped %d of %d prompts longer than %d tokens (data.max_prompt_tokens; at %s)",
                       cfg.path, len(too_long), n, cfg.max_prompt_tokens, _first(records, too_long))
    if resp_too_long:
        logger.warning("%s: dropped %d of %d responses longer than %d tokens (data.max_response_tokens; at %s)",
                       cfg.path, len(resp_too_long), n, cfg.max_response_tokens, _first(records, resp_too_long))
    if unknown:
        logger.warning("%s: dropped %d of %d records with text the tokenizer cannot represent (it encodes to its "
                       "unknown token %r; at %s): check the file's language and encoding against the tokenizer",
                       cfg.path, len(unknown), n, tokenizer.unk_token, _first(records, unknown))
    if not examples:
        raise DataError(f"{cfg.path}: all {n} records were dropped ({len(too_long)} prompts longer than "
                        f"data.max_prompt_tokens={cfg.max_prompt_tokens}, {len(resp_too_long)} responses longer than "
                        f"data.max_response_tokens={cfg.max_response_tokens}, {len(unknown)} with text the "
                        f"tokenizer encodes as its unknown token {tokenizer.unk_token!r})")
    return PromptSet(examples, n, len(too_long), len(resp_too_long), len(unknown))


# --- batching --------------------------------------------------------------------------------

END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


def check_vocab_fits(tokenizer, vocab_size: int, where: str, vocab_name: str) -> None:
    """Every id the tokenizer can produce must be a row of the model's embedding (else an IndexError,
    or a token read as another, later). ``where``: the tokenizer's directory; ``vocab_name``: how
    the user names the model's vocabulary size (``model.vocab_size``, ``the checkpoint's vocab_size``)."""
    if len(tokenizer) > vocab_size:
        raise ConfigError(f"the tokenizer in {where} has {len(tokenizer)} tokens but {vocab_name}={vocab_size}: "
                          "the tokenizer and the model do not match; use the model's own tokenizer")


def tokenizer_mask_id(tokenizer, where: str) -> int:
    """The [MASK] id a run takes when ``diffusion.mask_token_id`` is not set: the tokenizer's own mask
    token (``where``: the tokenizer's directory). A tokenizer without one (Qwen's, Llama's) needs the
    id chosen by hand: which unused row or reserved token is the model family's business."""
    if tokenizer.mask_token_id is None:
        raise ConfigError(
            f"diffusion.mask_token_id is not set and the tokenizer in {where} has no mask token: set it to a "
            f"reserved special token or an embedding row no token maps to (>= {len(tokenizer)} and below the "
            "model's vocab_size)")
    return int(tokenizer.mask_token_id)


def check_mask_token(mask_id: int, tokenizer, where: str, key: str = "diffusion.mask_token_id") -> None:
    """[MASK] must be an id no text uses: the tokenizer's mask token, an embedding row no token maps
    to, or a reserved special token. Refused: an ordinary token, and a special token the tokenizer
    writes itself (BOS / EOS / pad / unknown, end-of-turn markers, anything its chat template emits).
    ``key`` names the setting that gave the id (the trainer's config key, the exporter's flag).

    A [MASK] that text contains would be read as a mask wherever it occurs in a prompt or a
    response, and every prediction of that token would be a [MASK] (the sampler never emits one).
    """
    if mask_id == tokenizer.mask_token_id:
        return
    fix = (f": use its mask token ({tokenizer.mask_token_id})" if tokenizer.mask_token_id is not None else
           ": use") + f" a reserved special token or an embedding row no token maps to (>= {len(tokenizer)})"
    if mask_id < len(tokenizer) and mask_id not in tokenizer.added_tokens_decoder:
        raise ConfigError(f"{key}={mask_id} is the ordinary token "
                          f"{tokenizer.convert_ids_to_tokens(mask_id)!r} of the tokenizer in {where}{fix}")
    role = _special_role(mask_id, tokenizer)
    if role:
        raise ConfigError(f"{key}={mask_id} is {tokenizer.convert_ids_to_tokens(mask_id)!r}, the "
                          f"tokenizer's {role} (in {where}), a token that text contains{fix}")


def _special_role(token_id: int, tokenizer) -> Optional[str]:
    """What a special token is used for in text ('eos_token', 'end-of-turn marker', ...), or None."""
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token"):
        if getattr(tokenizer, f"{name}_id", None) == token_id:
            return name
    if token_id in eos_ids(tokenizer):
        return "end-of-turn marker"
    added = tokenizer.added_tokens_decoder.get(token_id)
    template = getattr(tokenizer, "chat_template", None)
    if added is not None and isinstance(template, str) and added.content in template:
        return "chat-template token"
    return None


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
    import torch

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
    import torch

    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lens = torch.tensor([min(len(s), width) for s in seqs], dtype=torch.long)
    for row, s in enumerate(seqs):
        n = int(lens[row])
        if n:
            ids[row, :n] = torch.tensor(list(s)[:n], dtype=torch.long)
    return ids, lens
