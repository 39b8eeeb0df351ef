"""Verifiable evaluation tasks: loading task files, building prompts, extracting and matching answers.

One job: turn a task file (GSM8K layout ``{question, answer: "... #### 42"}``, MATH/MATH-500 layout
``{problem, answer | solution with \\boxed{...}}``, the synthetic family's ``{prompt, response,
answer}``, or any ``{prompt_field, answer_field}`` for plain exact match; JSONL / JSON / Parquet /
a ``datasets`` folder saved with ``save_to_disk``) into examples with a gold answer, format prompts
(raw text with optional few-shot examples, or the tokenizer's chat template), and score a generated
text by exact match after extraction and normalisation, or, for MATH-style tasks, by math-verify's
symbolic equivalence. Non-goals: generation (``evaluate.py``).

Extraction: ``number`` takes the number after the last ``####`` (GSM8K's convention), else the last
number in the text; ``boxed`` takes the content of the last ``\\boxed{...}`` (nested braces
allowed), else the last number; ``exact`` takes the text up to the first stop string. Normalisation
drops ``$``, thousands separators, surrounding spaces, a trailing ``.``, ``\\text{}``/``\\left``/
``\\right`` wrappers and a leading ``x=``; numbers compare by value (``1,000`` == ``1000.0``,
``\\frac{1}{2}`` == ``1/2`` == ``0.5``), anything else as the normalised string. A task whose
``match`` is ``math`` (the ``math`` format) also accepts what math-verify judges equivalent
(``\\frac1{\\sqrt2}`` == ``\\frac{\\sqrt2}{2}``, tuples, sets, ``3^{2}`` == ``9``, ``2\\pi``,
``\\text{(B)}`` == ``B``), as the lighteval / lm-eval MATH tasks do; without math-verify installed it
warns once per task and keeps the exact rules.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Optional, Sequence

from nemo_opdlm.data.formats import FORMATS, MATCHES, TaskFormat
from nemo_opdlm.data.prompts import PromptDataConfig, read_records, use_chat_template
from nemo_opdlm.errors import DataError

# --- extraction ----------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # '\boxed 5' (no braces): the next token
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None  # unbalanced: the generation stopped inside the box


def last_number(text: str) -> Optional[str]:
    """The last number in the text (signs, thousands separators and decimals kept), or None."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def final_number(text: str) -> Optional[str]:
    """GSM8K convention: the number after the last ``####``; else the last number in the text."""
    tail = text.rsplit("####", 1)[1].split("\n", 1)[0] if "####" in text else None
    first = _NUMBER.search(tail) if tail is not None else None
    # the first number after the last '####' is the answer ('#### 42. Check: 3' -> 42)
    return first.group(0) if first else last_number(text)


def boxed_answer(text: str) -> Optional[str]:
    """MATH convention: the last ``\\boxed{}``; else the last number in the text."""
    box = last_boxed(text)
    return box if box is not None else last_number(text)


# --- normalisation and matching ------------------------------------------------------------------

_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac(\d)(\d)")


def normalize(answer: str) -> str:
    """Canonical string form of an answer (see the module docstring for the rules)."""
    s = answer.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:mathrm|textbf|mathbf)\{([^{}]*)\}", r"\1", s)
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\$", "$", "^\\circ", "^{\\circ}", "\\%", "%"):
        s = s.replace(junk, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # 'x = 5' -> '5'
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"(\d),(\d{3})", r"\1\2", s)
    s = re.sub(r"(\d),(\d{3})", r"\1\2", s)  # twice: '1,000,000'
    s = re.sub(r"\s+", " ", s)
    return s


def to_number(answer: str) -> Optional[Fraction]:
    """An exact rational for numbers, simple fractions ``a/b`` and ``\\frac{a}{b}`` (signs allowed)."""
    s = normalize(answer).replace(" ", "")
    m = _FRAC.fullmatch(s.lstrip("-"))
    if m:
        num, den = to_number(m.group(1)), to_number(m.group(2))
        if num is None or den is None or den == 0:
            return None
        value = num / den
        return -value if s.startswith("-") else value
    if re.fullmatch(r"-?\d+(?:\.\d+)?/-?\d+(?:\.\d+)?", s):
        num_s, den_s = s.split("/")
        den = Fraction(den_s)
        return None if den == 0 else Fraction(num_s) / den
    if re.fullmatch(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", s):
        return Fraction(s)
    return None


def answers_match(predicted: Optional[str], gold: str) -> bool:
    """Exact match after normalisation; numbers (incl. simple fractions) compare by value."""
    if predicted is None:
        return False
    p, g = to_number(predicted), to_number(gold)
    if p is not None and g is not None:
        return p == g
    return normalize(predicted) == normalize(gold)


MATH_VERIFY_MISSING = ("math-verify is not installed: MATH answers are compared by exact match after "
                       "normalisation, so equivalent forms (\\frac1{\\sqrt2} vs \\frac{\\sqrt2}{2}, tuples, sets, "
                       "3^{2} vs 9) count as wrong; `pip install -e .[eval]` (math-verify) to score them as MATH does")


def math_verify_available() -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _as_latex(answer: str) -> str:
    """An extracted answer as the inline LaTeX math-verify parses (its own ``$`` stripped first)."""
    return "$" + answer.strip().strip("$").strip() + "$"


def math_answers_match(predicted: Optional[str], gold: str) -> bool:
    """:func:`answers_match`, or else math-verify's symbolic equivalence of the two answers (gold
    first: math-verify reads its first argument as the reference). Without math-verify: exact only."""
    if predicted is None:
        return False
    if answers_match(predicted, gold):
        return True
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    return bool(verify(parse(_as_latex(gold)), parse(_as_latex(predicted))))


MATCHERS: dict[str, Callable[[Optional[str], str], bool]] = {
    "exact": answers_match,
    "math": math_answers_match,
}
"""One function per ``data.formats.MATCHES`` name."""
assert tuple(MATCHERS) == MATCHES


def truncate_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            i = text.find(stop)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


EXTRACTORS: dict[str, Callable[[str], Optional[str]]] = {
    "number": final_number,
    "boxed": boxed_answer,
    "exact": lambda text: text.strip(),
}


# --- tasks ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One scored item: the question text, the gold answer, and a worked solution (for few-shot)."""

    question: str
    gold: str
    solution: Optional[str] = None


def task_format(name: str, **overrides: Any) -> TaskFormat:
    """A built-in format ('gsm8k', 'math', 'synthetic') or 'exact' with fields given in ``overrides``."""
    if name == "exact":
        base = dict(name="exact", question_field="prompt", answer_field="answer", solution_field=None,
                    gold_from="exact", extract="exact", template="{question}", stop=("\n",))
        base.update(overrides)
        return TaskFormat(**base)
    if name not in FORMATS:
        raise DataError(f"unknown task {name!r}; choose one of {sorted(FORMATS) + ['exact']}")
    fmt = FORMATS[name]
    return TaskFormat(**{**fmt.__dict__, **overrides}) if overrides else fmt


def _gold(record: dict, fmt: TaskFormat, where: str) -> str:
    if fmt.name == "math" and record.get(fmt.answer_field) is None:
        # MATH (full) has only 'solution': the gold is its last \boxed{}
        box = last_boxed(str(record.get("solution", "")))
        if box is None:
            raise DataError(f"{where}: neither an 'answer' field nor a \\boxed{{}} in 'solution'")
        return box
    raw = record.get(fmt.answer_field)
    if raw is None:
        raise DataError(f"{where}: no field {fmt.answer_field!r}; fields are {sorted(record)}")
    raw = str(raw)
    if fmt.gold_from == "number":
        if "####" not in raw:
            raise DataError(f"{where}: the {fmt.answer_field!r} field has no '#### <answer>' line")
        return raw.rsplit("####", 1)[1].split("\n", 1)[0].strip()
    if fmt.gold_from == "boxed":
        box = last_boxed(raw)
        return box if box is not None else raw.strip()
    return raw.strip()


def records_to_examples(records: Sequence[dict], fmt: TaskFormat, source: str = "task") -> list[Example]:
    """Examples (question, gold, solution) from raw records; errors name the record and field."""
    out = []
    for i, rec in enumerate(records):
        where = f"{source}: record {i}"
        if rec.get(fmt.question_field) is None:
            raise DataError(f"{where}: no field {fmt.question_field!r}; fields are {sorted(rec)}")
        sol_field = fmt.solution_field or fmt.answer_field
        solution = rec.get(sol_field)
        out.append(Example(str(rec[fmt.question_field]), _gold(rec, fmt, where),
                           None if solution is None else str(solution)))
    return out


def load_examples(path: str, fmt: TaskFormat, *, split: str = "test", file_format: str = "auto",
                  limit: Optional[int] = None) -> list[Example]:
    """Read a task file (JSONL / JSON / Parquet / ``save_to_disk`` folder) into examples."""
    cfg = PromptDataConfig(path=path, format=file_format, split=split, prompt_field=fmt.question_field)
    records = read_records(cfg, all_columns=True)  # the answer/solution fields are needed too
    if limit is not None:
        records = records[:limit]
    return records_to_examples(records, fmt, path)


@dataclass
class Task:
    """A loaded task: examples to score, few-shot examples, and its format."""

    format: TaskFormat
    examples: list[Example]
    fewshot: list[Example] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.format.name


def load_task(name: str, path: str, *, split: str = "test", num_fewshot: int = 0,
              fewshot_path: Optional[str] = None, limit: Optional[int] = None, **overrides: Any) -> Task:
    """A task from a file. Few-shot examples come from ``fewshot_path`` (its first ``num_fewshot``
    records), else from the head of ``path``, which are then left out of the scored examples."""
    fmt = task_format(name, **overrides)
    if num_fewshot < 0:
        raise DataError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if fewshot_path:
        shots = load_examples(fewshot_path, fmt, split="train", limit=num_fewshot) if num_fewshot else []
        examples = load_examples(path, fmt, split=split, limit=limit)
    else:
        rows = load_examples(path, fmt, split=split, limit=None if limit is None else limit + num_fewshot)
        shots, examples = rows[:num_fewshot], rows[num_fewshot:]
    if num_fewshot and len(shots) < num_fewshot:
        raise DataError(f"asked for {num_fewshot} few-shot examples, found {len(shots)}")
    if any(s.solution is None for s in shots):
        raise DataError(f"few-shot examples need a solution field ({fmt.solution_field!r})")
    if not examples:
        raise DataError(f"{path}: no examples left to score")
    if fmt.match == "math" and not math_verify_available():
        warnings.warn(f"task {fmt.name!r}: {MATH_VERIFY_MISSING}", RuntimeWarning, stacklevel=2)
    return Task(fmt, examples, shots)


# --- prompts and scoring -------------------------------------------------------------------------

def use_chat(tokenizer, chat_template: str) -> bool:
    """Resolve 'auto' / 'always' / 'never' against the tokenizer (``data.prompts.use_chat_template``)."""
    return use_chat_template(tokenizer, chat_template, "chat_template")


def build_prompt(task: Task, example: Example, tokenizer, *, chat: bool, chat_kwargs: Optional[dict] = None) -> str:
    """The prompt text: few-shot examples then the question, as raw text or as chat turns."""
    fmt = task.format
    if chat:
        messages: list[dict] = []
        for shot in task.fewshot:
            messages.append({"role": "user", "content": shot.question + fmt.instruction})
            messages.append({"role": "assistant", "content": shot.solution})
        messages.append({"role": "user", "content": example.question + fmt.instruction})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(chat_kwargs or {}))
    parts = [fmt.template.format(question=s.question) + _shot_body(s) for s in task.fewshot]
    parts.append(fmt.template.format(question=example.question))
    return fmt.shot_separator.join(parts)


def _shot_body(shot: Example) -> str:
    """A few-shot answer appended right after the template (a space unless it starts with one)."""
    sol = shot.solution or ""
    return sol if sol[:1].isspace() else " " + sol


@dataclass(frozen=True)
class Score:
    """One scored generation."""

    extracted: Optional[str]
    correct: bool


def score(task: Task, generation: str, gold: str, *, chat: bool) -> Score:
    """Cut at the stop strings (raw-text prompts), extract, compare."""
    fmt = task.format
    text = generation if chat else truncate_at(generation, fmt.stop)
    extracted = EXTRACTORS[fmt.extract](text)
    return Score(extracted, MATCHERS[fmt.match](extracted, gold))
