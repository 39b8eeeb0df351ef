"""Task formats: how a verifiable task's records become prompts and how its answers are read.

One job: the built-in formats (``gsm8k``, ``math``, ``synthetic``, ``sort``) as data: fields,
raw-text template, few-shot separator, stop strings, the chat instruction, and how the gold and
the prediction are extracted and matched. Both the prompt files (``data.prompt_template`` writes
training prompts as a task would: ``data/prompts.py``) and the evaluation (``eval/tasks.py``, which
implements the extraction and matching) read them, so they live below both. Non-goals: reading
task files, scoring (``eval/tasks.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from nemo_opdlm.errors import DataError

MATCHES = ("exact", "math")
"""How an extracted answer may meet the gold (``eval.tasks.MATCHERS`` has one function each)."""


@dataclass(kw_only=True, frozen=True)
class TaskFormat:
    """How a task's records become prompts, and how its answers are extracted."""

    name: str
    question_field: str
    answer_field: str
    solution_field: Optional[str]
    """Field holding a worked solution, used for few-shot examples (None: the answer field)."""
    gold_from: str
    """How the gold answer is read from ``answer_field``: 'number' (after '####'), 'boxed', 'exact'."""
    extract: str
    """How the prediction is read from the generation: 'number', 'boxed' or 'exact'."""
    template: str
    """Raw-text prompt for one question; ``{question}`` is replaced."""
    shot_separator: str = "\n\n"
    """Between few-shot examples (and before the question)."""
    stop: tuple[str, ...] = ()
    """Stop strings: the generation is cut at the first one before scoring (raw-text prompts)."""
    instruction: str = ""
    """Appended to the question when the chat template is used."""
    match: str = "exact"
    """How an extracted answer meets the gold (:data:`MATCHES`; ``eval.tasks.MATCHERS`` implements
    them): 'exact' (normalised, numbers by value) or 'math' (also math-verify's symbolic equivalence,
    for MATH-style answers)."""

    def __post_init__(self) -> None:
        if self.match not in MATCHES:
            raise DataError(f"task {self.name!r}: match={self.match!r} is not one of {sorted(MATCHES)}")


FORMATS: dict[str, TaskFormat] = {
    "gsm8k": TaskFormat(
        name="gsm8k", question_field="question", answer_field="answer", solution_field="answer",
        gold_from="number", extract="number", template="Question: {question}\nAnswer:",
        stop=("\n\nQuestion:", "Question:", "</s>", "<|im_end|>"),
        instruction="\nPlease reason step by step, and put your final answer after '####'.",
    ),
    "math": TaskFormat(
        name="math", question_field="problem", answer_field="answer", solution_field="solution",
        gold_from="exact", extract="boxed", template="Problem: {question}\nSolution:",
        stop=("\n\nProblem:", "Problem:", "</s>", "<|im_end|>"),
        instruction="\nPlease reason step by step, and put your final answer within \\boxed{}.",
        match="math",
    ),
    "synthetic": TaskFormat(
        name="synthetic", question_field="prompt", answer_field="answer", solution_field="response",
        gold_from="exact", extract="number", template="{question}", shot_separator="\n", stop=("\n",),
    ),
    "sort": TaskFormat(  # eval/synthetic.py's sort family: the answer is the whole (sorted) response
        name="sort", question_field="prompt", answer_field="answer", solution_field="response",
        gold_from="exact", extract="exact", template="{question}", shot_separator="\n", stop=("\n",),
    ),
}
