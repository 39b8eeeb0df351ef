"""Synthetic verifiable task families, small enough to train and convert on a CPU in minutes.

One job: generate problems (deterministic by seed, with difficulty knobs), split them into train and
held-out sets that can never overlap, build each family's tiny tokenizer in code, and write both to
disk in the layouts the rest of the package reads (JSONL prompt files, ``save_pretrained``
tokenizer folders). Non-goals: training, scoring (``tasks.py``: the ``synthetic`` format extracts the
``#### N`` answer, the ``sort`` format compares the answer exactly).

Two families of different kinds, each with its own vocabulary (the four special tokens keep the same
ids in both: ``[PAD]=0, [EOS]=1, [MASK]=2, [UNK]=3``):

``arithmetic`` (:class:`ArithmeticConfig`): multi-step integer arithmetic with worked steps::

    prompt:   "Q: 3+4*2-5=? A:"
    response: " 4*2=8. 3+8=11. 11-5=6. #### 6"

The response performs one operation per step in the usual precedence order (every ``*`` first,
left to right, then ``+`` and ``-`` left to right), so the answer is reachable only by chaining
the steps: a sequential computation whose later tokens depend on results written earlier.

``sort`` (:class:`SortConfig`): sort a word of letters, duplicates kept::

    prompt:   "S: dacab A:"
    response: " aabcd"

Every output letter depends on the whole input and on how many of each letter were already
written: a global rearrangement rather than a chain of local steps, and one where the tokens of a
block constrain each other (a block decoded in parallel must agree on the counts).

The split is decided by a hash of the problem's text, not by the seed: a problem is held out iff
``sha256(key) mod 1000 < 1000 * heldout_fraction`` (the key is the expression or the input word),
so train and held-out sets drawn with any seeds are disjoint, and a larger held-out set contains a
smaller one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence, Union

from nemo_opdlm.errors import ConfigError

OPERATORS = ("+", "-", "*")
PAD, EOS, MASK, UNK = "[PAD]", "[EOS]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD, EOS, MASK, UNK)


@dataclass(kw_only=True, frozen=True)
class ArithmeticConfig:
    """Difficulty knobs of the arithmetic family."""

    min_operands: int = 2
    """Fewest numbers in an expression (>= 2: at least one step)."""
    max_operands: int = 3
    """Most numbers in an expression."""
    min_value: int = 0
    """Smallest operand."""
    max_value: int = 9
    """Largest operand (9: one digit, 99: up to two digits)."""
    operators: tuple[str, ...] = ("+", "-")
    """Operators to draw from, a subset of ('+', '-', '*')."""
    max_abs_result: int = 999
    """Problems with an intermediate or final value beyond +/- this are redrawn."""
    allow_negative: bool = False
    """Whether intermediate and final values may be negative (else such problems are redrawn)."""
    heldout_fraction: float = 0.1
    """Share of the problem space (by hash) reserved for the held-out split."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "operators", tuple(self.operators))
        if not 2 <= self.min_operands <= self.max_operands:
            raise ConfigError(
                f"arithmetic: need 2 <= min_operands ({self.min_operands}) <= max_operands ({self.max_operands})"
            )
        if not 0 <= self.min_value <= self.max_value:
            raise ConfigError(f"arithmetic: need 0 <= min_value ({self.min_value}) <= max_value ({self.max_value})")
        if not self.operators or any(op not in OPERATORS for op in self.operators):
            raise ConfigError(f"arithmetic.operators must be a non-empty subset of {OPERATORS}, got {self.operators}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"arithmetic.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.max_abs_result < self.max_value:
            raise ConfigError(
                f"arithmetic.max_abs_result ({self.max_abs_result}) must be >= max_value ({self.max_value})"
            )


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem with its worked answer."""

    expression: str
    """e.g. '3+4*2-5'."""
    steps: tuple[str, ...]
    """One operation each, e.g. ('4*2=8', '3+8=11', '11-5=6')."""
    answer: int

    @property
    def key(self) -> str:
        """The text that decides the split and identity of the problem."""
        return self.expression

    @property
    def prompt(self) -> str:
        return f"Q: {self.expression}=? A:"

    @property
    def response(self) -> str:
        return " " + "".join(f"{s}. " for s in self.steps) + f"#### {self.answer}"

    def record(self) -> dict:
        """The JSONL record: prompt + response (training data), answer (scoring), expression."""
        return {"prompt": self.prompt, "response": self.response, "answer": str(self.answer),
                "expression": self.expression}


def solve(numbers: Sequence[int], ops: Sequence[str]) -> tuple[list[str], list[int]]:
    """Worked steps and every intermediate value: ``*`` first (left to right), then ``+``/``-``."""
    if len(ops) != len(numbers) - 1:
        raise ValueError(f"{len(numbers)} numbers need {len(numbers) - 1} operators, got {len(ops)}")
    nums, ops = list(numbers), list(ops)
    steps: list[str] = []
    values: list[int] = []
    for pass_ops in (("*",), ("+", "-")):
        i = 0
        while i < len(ops):
            if ops[i] not in pass_ops:
                i += 1
                continue
            a, b, op = nums[i], nums[i + 1], ops[i]
            c = a * b if op == "*" else a + b if op == "+" else a - b
            steps.append(f"{a}{op}{b}={c}")
            values.append(c)
            nums[i: i + 2] = [c]
            del ops[i]
    return steps, values


def is_heldout(text: str, fraction: float) -> bool:
    """The split rule: a stable hash of the problem's text (independent of seeds and Python's hash)."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < round(1000 * fraction)


def draw(rng: random.Random, cfg: TaskConfig) -> AnyProblem:
    """One problem of ``cfg``'s family (arithmetic: redrawn until its values respect the limits)."""
    if isinstance(cfg, SortConfig):
        return draw_sort(rng, cfg)
    while True:
        n = rng.randint(cfg.min_operands, cfg.max_operands)
        numbers = [rng.randint(cfg.min_value, cfg.max_value) for _ in range(n)]
        ops = [rng.choice(cfg.operators) for _ in range(n - 1)]
        steps, values = solve(numbers, ops)
        if any(abs(v) > cfg.max_abs_result for v in values):
            continue
        if not cfg.allow_negative and any(v < 0 for v in values):
            continue
        expression = "".join(f"{x}{op}" for x, op in zip(numbers, ops)) + str(numbers[-1])
        return Problem(expression, tuple(steps), values[-1])


# --- the sort family ----------------------------------------------------------------------------

SORT_LETTERS = "abcdefghijklmnop"
"""The sort family's vocabulary of letters (an alphabet is a subset of it)."""

@dataclass(kw_only=True, frozen=True)
class SortConfig:
    """Difficulty knobs of the sorting family."""

    min_length: int = 5
    """Fewest letters in a word."""
    max_length: int = 10
    """Most letters in a word."""
    alphabet: str = "abcdefghijkl"
    """Letters to draw from (each one token; duplicates allowed in a word)."""
    heldout_fraction: float = 0.1
    """Share of the problem space (by hash) reserved for the held-out split."""

    def __post_init__(self) -> None:
        if not 2 <= self.min_length <= self.max_length:
            raise ConfigError(f"sort: need 2 <= min_length ({self.min_length}) <= max_length ({self.max_length})")
        if len(set(self.alphabet)) != len(self.alphabet) or len(self.alphabet) < 2 or \
                not set(self.alphabet) <= set(SORT_LETTERS):
            raise ConfigError(f"sort.alphabet must be >= 2 distinct letters of {SORT_LETTERS!r}, got {self.alphabet!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"sort.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class SortProblem:
    """One word to sort."""

    letters: str
    """The input word, e.g. 'dacab'."""

    @property
    def key(self) -> str:
        return self.letters

    @property
    def answer(self) -> str:
        return "".join(sorted(self.letters))

    @property
    def prompt(self) -> str:
        return f"S: {self.letters} A:"

    @property
    def response(self) -> str:
        return " " + self.answer

    def record(self) -> dict:
        """The JSONL record: prompt + response (training data), answer (scoring), the input word."""
        return {"prompt": self.prompt, "response": self.response, "answer": self.answer, "letters": self.letters}


def draw_sort(rng: random.Random, cfg: SortConfig) -> SortProblem:
    n = rng.randint(cfg.min_length, cfg.max_length)
    return SortProblem("".join(rng.choice(cfg.alphabet) for _ in range(n)))


# --- families ----------------------------------------------------------------------------------

TaskConfig = Union[ArithmeticConfig, SortConfig]
AnyProblem = Union[Problem, SortProblem]


@dataclass(frozen=True)
class Family:
    """What differs between the synthetic families."""

    name: str
    config: type
    words: tuple[str, ...]
    """Multi-character tokens (tried first by the pre-tokenizer)."""
    chars: tuple[str, ...]
    """Single-character tokens."""
    eval_format: str
    """The ``eval/tasks.py`` format that scores the family's held-out file."""


FAMILIES: dict[str, Family] = {
    "arithmetic": Family("arithmetic", ArithmeticConfig, words=("####", "Q:", "A:"),
                         chars=tuple("0123456789") + ("+", "-", "*", "=", "?", ".", " ", "\n"),
                         eval_format="synthetic"),
    "sort": Family("sort", SortConfig, words=("S:", "A:"), chars=tuple(SORT_LETTERS) + (" ", "\n"),
                   eval_format="sort"),
}


def family_of(cfg: TaskConfig) -> Family:
    """The family whose knobs ``cfg`` holds."""
    for fam in FAMILIES.values():
        if isinstance(cfg, fam.config):
            return fam
    raise ConfigError(f"not a synthetic task config: {type(cfg).__name__}")


def task_config(name: str) -> TaskConfig:
    """Default knobs of family ``name`` ('arithmetic' or 'sort')."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown synthetic task {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name].config()


def problems(cfg: TaskConfig, split: str, seed: int) -> Iterator[AnyProblem]:
    """An endless stream of distinct problems of ``split`` ('train' or 'test'), fixed by ``seed``.

    Stops (rather than looping forever) once 200 consecutive draws in a row found nothing new,
    i.e. when the problem space of the split is exhausted.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    want_heldout = split == "test"
    fam = family_of(cfg)
    # The arithmetic stream keeps its original seed string (the demo's problems stay the same).
    rng = random.Random(f"opdlm-{'arith' if fam.name == 'arithmetic' else fam.name}-{seed}-{split}")
    seen: set[str] = set()
    misses = 0
    while misses < 200 * max(1, round(1 / min(cfg.heldout_fraction, 1 - cfg.heldout_fraction))):
        p = draw(rng, cfg)
        if p.key in seen or is_heldout(p.key, cfg.heldout_fraction) != want_heldout:
            misses += 1
            continue
        misses = 0
        seen.add(p.key)
        yield p


def make_split(cfg: TaskConfig, split: str, n: int, seed: int) -> list[AnyProblem]:
    """``n`` distinct problems of ``split`` (fewer only if the split's problem space is smaller)."""
    out: list[Problem] = []
    for p in problems(cfg, split, seed):
        out.append(p)
        if len(out) == n:
            break
    return out


# --- tokenizer ---------------------------------------------------------------------------------

def vocabulary(family: str = "arithmetic") -> dict[str, int]:
    """Token -> id: the specials first ([PAD]=0, [EOS]=1, [MASK]=2, [UNK]=3), then words and chars."""
    fam = FAMILIES[family]
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + fam.words + fam.chars)}


def split_pattern(family: str = "arithmetic") -> str:
    """The pre-tokenizer's regex: each word, then any single character of the vocabulary."""
    fam = FAMILIES[family]
    return "|".join([re.escape(w) for w in fam.words] + ["[" + "".join(re.escape(c) for c in fam.chars) + "]"])


def build_tokenizer(family: str = "arithmetic"):
    """A ``PreTrainedTokenizerFast`` for a family: one token per character or word, exact round trip.

    Word-level model over a regex pre-tokenizer (every match is one token) with a fusing decoder,
    so ``decode(encode(text)) == text``. No BOS, no post-processor, no chat template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ConfigError(f"unknown synthetic task {family!r}; choose one of {sorted(FAMILIES)}")
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(family), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(split_pattern(family)), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, mask_token=MASK, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=4096,
    )


# --- writers -----------------------------------------------------------------------------------

def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write records one per line; returns how many."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n


@dataclass(frozen=True)
class SyntheticData:
    """Paths written by :func:`write_task`."""

    train: str
    test: str
    tokenizer: str
    num_train: int
    num_test: int
    family: str = "arithmetic"
    """The family's name (its ``eval_format`` scores ``test``)."""

    @property
    def eval_format(self) -> str:
        return FAMILIES[self.family].eval_format


def write_task(out_dir: str, cfg: TaskConfig, *, num_train: int, num_test: int, seed: int = 0) -> SyntheticData:
    """``train.jsonl``, ``test.jsonl``, ``tokenizer/`` and ``task.json`` (the knobs) under ``out_dir``."""
    fam = family_of(cfg)
    os.makedirs(out_dir, exist_ok=True)
    train = os.path.join(out_dir, "train.jsonl")
    test = os.path.join(out_dir, "test.jsonl")
    tok_dir = os.path.join(out_dir, "tokenizer")
    n_train = write_jsonl(train, (p.record() for p in make_split(cfg, "train", num_train, seed)))
    n_test = write_jsonl(test, (p.record() for p in make_split(cfg, "test", num_test, seed)))
    build_tokenizer(fam.name).save_pretrained(tok_dir)
    with open(os.path.join(out_dir, "task.json"), "w") as f:
        json.dump({"family": fam.name, "seed": seed, "config": asdict(cfg),
                   "num_train": n_train, "num_test": n_test}, f, indent=2)
    return SyntheticData(train, test, tok_dir, n_train, n_test, fam.name)
