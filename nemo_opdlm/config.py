"""The run config: one schema for a whole OPDLM job, validated before any heavy work.

One job: the ``RunConfig`` dataclass tree, its loading from a recipe (a Python function returning a
``RunConfig``) or a YAML file, and ``key=value`` overrides. Unknown keys are refused with the
closest valid key named; every section validates itself in ``__post_init__``; errors name the key.
Non-goals: building anything from the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

from nemo_opdlm.data.prompts import PromptDataConfig
from nemo_opdlm.distill.methods import get_method
from nemo_opdlm.errors import ConfigError
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig, RopeScaling
from nemo_opdlm.rollout.decode import BLOCK_MODES, DecodeConfig
from nemo_opdlm.rollout.schedules import CURRICULA, BlockSchedule
from nemo_opdlm.teacher.route import choose_route
from nemo_opdlm.runtime.distributed import ParallelLayout



@dataclass(kw_only=True)
class InitConfig:
    """Where the weights come from."""

    teacher_hf: Optional[str] = None
    """HF checkpoint directory of the AR teacher (imported on the fly)."""
    teacher_checkpoint: Optional[str] = None
    """A megatron dist checkpoint of the teacher (from tools/import_hf.py), instead of teacher_hf."""
    student_hf: Optional[str] = None
    """HF directory for the student's initial weights; None = the teacher's weights (self-distillation)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; None = teacher_hf, else student_hf, else teacher_checkpoint's copy
    (``hf_assets/``: imports and trainer steps carry the tokenizer)."""

    def __post_init__(self) -> None:
        if self.teacher_hf and self.teacher_checkpoint:
            raise ConfigError("init.teacher_hf and init.teacher_checkpoint are exclusive: set one")

    def tokenizer_dir(self) -> str:
        """The directory the run's tokenizer is read from (see ``tokenizer``)."""
        path = self.tokenizer or self.teacher_hf or self.student_hf
        if not path and self.teacher_checkpoint:
            path = os.path.join(self.teacher_checkpoint, "hf_assets")
            if not os.path.isdir(path):
                raise ConfigError(f"init.teacher_checkpoint {self.teacher_checkpoint} carries no tokenizer "
                                  "(no hf_assets/): set init.tokenizer")
        if not path:
            raise ConfigError("set init.tokenizer (or init.teacher_hf) to a directory with the tokenizer files")
        if not os.path.isdir(path):
            raise ConfigError(f"init.tokenizer: {path} is not a directory")
        from nemo_opdlm.convert.hf_config import VOCABULARY_FILES, has_tokenizer_files

        if not has_tokenizer_files(path):
            key = "init.tokenizer" if self.tokenizer else "init.teacher_hf" if self.teacher_hf else \
                "init.student_hf" if self.student_hf else "init.teacher_checkpoint"
            raise ConfigError(f"{key}: {path} has no tokenizer files (none of {', '.join(VOCABULARY_FILES)}): set "
                              "init.tokenizer to the directory the model's tokenizer was saved to (its HF directory)")
        return path

    def architecture_source(self, separate_teacher: bool) -> tuple[str, str]:
        """``(path, config key)`` of the weights whose architecture the student has: its own
        (``student_hf``) when the teacher differs, else the teacher's, which it starts from."""
        if separate_teacher:
            sources = (("init.student_hf", self.student_hf),)
        else:
            sources = (("init.teacher_hf", self.teacher_hf), ("init.teacher_checkpoint", self.teacher_checkpoint),
                       ("init.student_hf", self.student_hf))
        for key, path in sources:
            if path:
                return path, key
        need = "init.student_hf (teacher_model is set)" if separate_teacher else "init.teacher_hf"
        raise ConfigError(f"model is not set and there are no weights to read it from: set {need}, whose config.json "
                          "gives the architecture, or the model.* fields")


@dataclass(kw_only=True)
class RolloutConfig(DecodeConfig):
    """How the student decodes its own responses each step: the decoding settings (``DecodeConfig``:
    mode, threshold, rounds per block, sampling, cache) and the rollout length.

    Two decoding defaults differ from evaluation's, as in the paper: rollouts use the confidence
    threshold and sample at temperature 1 (evaluation decodes greedily, 1 token per round)."""

    mode: str = "dynamic"
    """'dynamic' (the paper's rollouts: every position above ``threshold``, at least the static
    count) or 'static'."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the paper's 1.0); 0 = greedy."""
    static_fraction: float = 0.0
    """Share of each step's rollouts (the first rows of every rank's batch; prompts are shuffled)
    decoded with the static schedule instead of the threshold, in the same forwards (mode
    'dynamic' only). A confident student's threshold rollouts finish most blocks in one round, so
    their states are almost all fully masked and the partly decoded blocks that static evaluation
    visits go untrained; static rows put those states back. 0 = the paper's all-threshold rollouts."""
    min_length: int = 100
    """Curriculum: generation length at step 0."""
    max_length: int = 4000
    """Curriculum: generation length after ``curriculum_steps``."""
    curriculum_steps: int = 100
    """Steps over which the length grows from min_length to max_length."""
    curriculum: str = "linear"
    """Shape of that growth: 'linear' (the paper) or 'cosine' (the reference launcher's ramp,
    rounded to whole blocks; see ``rollout/schedules.LengthCurriculum``)."""
    max_length_by_domain: dict[str, int] = field(default_factory=dict)
    """Per-domain caps on the rollout length, e.g. ``{science: 1024, code: 2048, chat: 2048}`` as the
    reference caps them: a prompt whose ``data.domain_field`` names a listed domain is rolled out
    to at most that many tokens (other prompts follow the curriculum alone)."""

    @property
    def where(self) -> str:
        return "rollout"

    def __post_init__(self) -> None:
        self.check_values(BLOCK_MODES)
        if not 1 <= self.min_length <= self.max_length:
            raise ConfigError(
                f"rollout.min_length ({self.min_length}) must be >= 1 and <= rollout.max_length ({self.max_length})"
            )
        if self.curriculum_steps < 0:
            raise ConfigError(f"rollout.curriculum_steps must be >= 0, got {self.curriculum_steps}")
        if self.curriculum not in CURRICULA:
            raise ConfigError(f"rollout.curriculum must be one of {CURRICULA}, got {self.curriculum!r}")
        for domain, cap in self.max_length_by_domain.items():
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
                raise ConfigError(f"rollout.max_length_by_domain.{domain} must be an integer >= 1, got {cap!r}")
        if not 0.0 <= self.static_fraction <= 1.0:
            raise ConfigError(f"rollout.static_fraction must be in [0, 1], got {self.static_fraction}")
        if self.static_fraction > 0 and self.mode != "dynamic":
            raise ConfigError("rollout.static_fraction mixes static rows into threshold rollouts: it needs "
                              f"rollout.mode='dynamic' (got {self.mode!r}; static rollouts are all static already)")


@dataclass(kw_only=True)
class DistillConfig:
    """What the student learns from."""

    method: str = "opdlm"
    """'opdlm' (own rollouts, masks from the decoding trajectory), 'random_mask' (own rollouts,
    random masks), 'off_policy' (teacher responses, random masks, KL), 'sft' (dataset responses,
    random masks, cross-entropy), 'ar' (causal next-token pre-training of a teacher: the demo);
    ``distill/methods.py`` describes each."""
    top_k: Optional[int] = None
    """KL over the teacher's top-k log-probs (16 at >= 4B in the paper); None = full vocabulary."""
    exclude_eos: bool = True
    """Leave the end-of-turn token itself out of the loss (the reference does)."""
    teacher_offload: bool = False
    """Keep the teacher's weights on CPU between uses (GPU memory is tight)."""

    def __post_init__(self) -> None:
        get_method(self.method)  # a known method
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"distill.top_k must be >= 1 or None, got {self.top_k}")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with cosine decay and linear warm-up (the paper's defaults)."""

    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 1e-6
    """Final learning rate of the cosine decay."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (megatron-core distributed optimizer)."""

    def __post_init__(self) -> None:
        if not self.lr >= 0:  # NaN too: the min_lr check below would blame optim.min_lr for it
            raise ConfigError(f"optim.lr must be a number >= 0, got {self.lr}: set optim.lr to the peak "
                              "learning rate, e.g. optim.lr=1e-5")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr ({self.min_lr}) must be in [0, optim.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")


@dataclass(kw_only=True)
class TrainConfig:
    """Steps, batch sizes, checkpoints and logging."""

    steps: int = 100
    """Optimizer steps (one rollout batch each)."""
    prompts_per_step: int = 128
    """Prompts rolled out per step (global, across data-parallel ranks)."""
    micro_batch_size: int = 1
    """Training rows per micro-batch on one data-parallel rank (unused with ``pack_tokens``)."""
    pack_tokens: Optional[int] = None
    """Build micro-batches by a token budget instead of ``micro_batch_size`` rows: each micro-batch
    is one sequence of exactly this many tokens holding several rows' real tokens (packed rows,
    ``distill/packing.py``; the same loss and gradients as padded rows). None = padded rows. Must
    hold the longest row, ``data.max_prompt_tokens + 2 * rollout.max_length``; diffusion methods only,
    and at ``parallel.pp`` > 1 only with a teacher at its own layout (``parallel.teacher``) or none."""
    seed: int = 1234
    """Base seed; every random stream is derived from it, the step and the rank."""
    log_every: int = 1
    """Print and record metrics every N steps."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    exit_interval: Optional[int] = None
    """Stop with a checkpoint after a step divisible by N, before ``train.steps`` (Megatron-LM's
    ``--exit-interval``): a long schedule run in segments, each started again to resume (status
    ``exited``). Needs ``save_dir``. None = run to ``train.steps``."""
    save_dir: Optional[str] = None
    """Checkpoint directory (step_N/ sub-directories and a 'latest' file); None = no checkpoints."""
    resume: bool = True
    """Resume from save_dir's latest checkpoint when there is one (without a ``latest`` pointer:
    its newest complete ``step_N``)."""
    overwrite: bool = False
    """With ``resume=false``: replace a run already in save_dir (its checkpoints and metrics are
    removed first). Without it such a run is refused, not silently written over."""
    max_nonfinite_in_row: int = 3
    """Non-finite losses skip their step; this many in a row stop the run with an error."""
    tensorboard_dir: Optional[str] = None
    """TensorBoard scalars; None = save_dir/tensorboard when save_dir is set."""
    wandb_project: Optional[str] = None
    """Weights & Biases project (off when None)."""

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "micro_batch_size", "log_every", "max_nonfinite_in_row"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ConfigError(f"train.save_every must be >= 0, got {self.save_every}")
        if self.pack_tokens is not None and self.pack_tokens < 1:
            raise ConfigError(f"train.pack_tokens must be >= 1 or null, got {self.pack_tokens}")
        if self.exit_interval is not None:
            if self.exit_interval < 1:
                raise ConfigError(f"train.exit_interval must be >= 1 or null, got {self.exit_interval}")
            if self.save_dir is None:
                raise ConfigError("train.exit_interval stops the run to be resumed: set train.save_dir")


@dataclass(kw_only=True)
class RunConfig:
    """A whole OPDLM job."""

    name: str = "opdlm"
    """Run name (logs, checkpoints)."""
    model: Optional[ModelConfig] = None
    """Student architecture (the teacher's unless teacher_model is set). None: read from the weights
    ``init`` names (``init.teacher_hf``'s config.json, else ``init.teacher_checkpoint``'s recorded
    config, else ``init.student_hf``'s; with a ``teacher_model``: ``init.student_hf``'s), as
    Megatron-Bridge's AutoBridge does, when the run starts (:meth:`complete`). A model that is stated
    must agree with those weights on every architecture field (layers, widths, heads, vocabulary,
    ``rotary_base``, ``rope_scaling``, ``norm_eps``, embedding tying): each differing one is named
    before any model is built."""
    teacher_model: Optional[ModelConfig] = None
    """A different (e.g. larger) teacher architecture; None = same as the student."""
    diffusion: DiffusionConfig
    """Block size and [MASK] id."""
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    """The student's TP/PP layout, DP the rest; the colocated teacher's too, unless ``parallel.teacher``
    gives it its own TP/PP on the same ranks."""
    init: InitConfig = field(default_factory=InitConfig)
    """Weights and tokenizer."""
    data: Optional[PromptDataConfig] = None
    """Prompts (and responses for off_policy/sft); None only for synthetic demo tasks."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """On-policy decoding."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Method and loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, checkpoints, logging."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def teacher(self) -> Optional[ModelConfig]:
        """The teacher as configured (``teacher_model``, else the student's architecture)."""
        return self.teacher_model or self.model

    @property
    def teacher_built(self) -> Optional[ModelConfig]:
        """The teacher as this run builds it: with the student's vocabulary rows.

        A teacher whose vocabulary differs from the student's only in padding rows (Qwen2.5-7B's
        152,064 rows against 1.5B's 151,936, one tokenizer of 151,665 ids for both) is read with its
        rows past ``model.vocab_size`` dropped: both models' logits then cover the same ids, the
        padding past them masked (``models/gpt.mask_vocab_padding``), so the KL runs over the shared
        ids (full, top-k, any TP, the teacher's own layout) and no teacher top-k id can fall past the
        student's rows. ``_validate_model`` accepts only a teacher at least as large;
        ``training/setup.load_tokenizer`` checks that the tokenizer fits the shared rows."""
        t, m = self.teacher, self.model
        if t is None or m is None or t.vocab_size == m.vocab_size:
            return t
        return dataclasses.replace(t, vocab_size=m.vocab_size, make_vocab_size_divisible_by=m.make_vocab_size_divisible_by)

    @property
    def longest_row(self) -> Optional[int]:
        """Tokens of the longest ``[prompt | x0 | xt]`` training row, when prompts come from files. On
        the absolute grid x0 and xt also hold the prompt's last ``P mod b`` tokens (``models/grid.py``):
        up to ``b - 1`` more, as the rows are counted by ``train.pack_tokens``."""
        if self.data is None:
            return None
        head = self.diffusion.block_size - 1 if self.diffusion.block_grid == "absolute" else 0
        return self.data.max_prompt_tokens + 2 * self.rollout.max_length + head

    def teacher_route(self, packed: Optional[bool] = None) -> Optional[str]:
        """The route of this run's teacher targets (``teacher.route.choose_route``: the one table),
        or None for the combination none serves. ``packed``: packed micro-batches (default: whether
        ``train.pack_tokens`` is set)."""
        return choose_route(teacher=get_method(self.distill.method).needs_teacher,
                            own_layout=self.parallel.teacher is not None,
                            pipelined=self.parallel.pp > 1 or self.parallel.vpp is not None,
                            packed=self.train.pack_tokens is not None if packed is None else packed)

    def _head_term(self) -> str:
        """How ``longest_row`` counts the absolute grid's heads, for its error messages."""
        return " + (diffusion.block_size - 1)" if self.diffusion.block_grid == "absolute" else ""

    def complete(self) -> "RunConfig":
        """This config with what it leaves to its files read from them, validated: the ``model`` from
        its weights' config (``model=None``), the [MASK] id from the tokenizer's mask token
        (``diffusion.mask_token_id=None``). Idempotent; reads files only for what is unset. A recipe or
        a YAML file is a config as written (its paths may be overridden); ``resolve`` completes it."""
        model, mask = self.model, self.diffusion.mask_token_id
        if model is None:
            from nemo_opdlm.convert.architecture import model_config_of_weights

            model = model_config_of_weights(*self.init.architecture_source(self.teacher_model is not None))
        if mask is None:
            from transformers import AutoTokenizer

            from nemo_opdlm.data.prompts import tokenizer_mask_id

            where = self.init.tokenizer_dir()
            mask = tokenizer_mask_id(AutoTokenizer.from_pretrained(where), where)
        if model is self.model and mask == self.diffusion.mask_token_id:
            return self
        return dataclasses.replace(self, model=model, diffusion=dataclasses.replace(self.diffusion, mask_token_id=mask))

    def validate(self) -> None:
        """Cross-section checks (each section checked itself already); the model-dependent ones wait
        for a ``model`` (:meth:`complete`)."""
        method = get_method(self.distill.method)
        if method.needs_dataset_responses and self.data is not None and not self.data.response_field:
            raise ConfigError(f"distill.method={method.name} needs data.response_field (the responses to learn)")
        BlockSchedule.of(self.diffusion, self.rollout)  # rollout.steps_per_block fits the block
        if self.rollout.max_length_by_domain and (self.data is None or not self.data.domain_field):
            raise ConfigError("rollout.max_length_by_domain caps rollouts by each prompt's domain: set "
                              "data.domain_field to the record field that names it")
        rows = self.train.prompts_per_step
        if rows % self.train.micro_batch_size:
            raise ConfigError(
                f"train.prompts_per_step={rows} is not divisible by train.micro_batch_size="
                f"{self.train.micro_batch_size}"
            )
        if self.train.pack_tokens is not None:
            self._validate_packing(method)
        if self.parallel.teacher is not None and method.responses == "teacher" and (
                self.data is None or not self.data.response_field):
            raise ConfigError(f"distill.method={method.name} without data.response_field has the teacher decode the "
                              "responses, which runs at the student's layout: set parallel.teacher=null, or give "
                              "the teacher's responses in data.response_field")
        self._validate_warmup()
        if self.model is not None:
            self._validate_model()

    def _validate_warmup(self) -> None:
        """A warm-up as long as the run leaves no step at the peak learning rate (with
        ``warmup_steps >= steps`` every step is in the ramp, the first at lr 0): refused, naming both.
        ``train.steps`` is the whole schedule's length, a resumed or continued run's too."""
        warmup, steps = self.optim.warmup_steps, self.train.steps
        if warmup and warmup >= steps:
            raise ConfigError(
                f"optim.warmup_steps={warmup} >= train.steps={steps}: every step would be in the learning-rate "
                f"warm-up (the first at lr 0) and none at optim.lr: set optim.warmup_steps below train.steps "
                f"(e.g. optim.warmup_steps={min(warmup, steps // 10)}) or raise train.steps")

    def _validate_packing(self, method) -> None:
        """``train.pack_tokens``: what packed rows support today, and a budget that holds any row."""
        if method.causal:
            raise ConfigError(f"train.pack_tokens packs [prompt | x0 | xt] rows; distill.method={method.name} "
                              "trains causal rows: set train.pack_tokens=null")
        if self.teacher_route() is None:
            raise ConfigError(
                f"train.pack_tokens with parallel.pp={self.parallel.pp} and distill.method={method.name}: the teacher "
                "sharing the student's layout rides its pipeline pass on padded rows; give the teacher its own "
                "layout (parallel.teacher.tp=..., its targets then come before the pass), or set "
                "train.pack_tokens=null or parallel.pp=1")
        longest = self.longest_row
        if longest is not None and self.train.pack_tokens < longest:
            raise ConfigError(
                f"train.pack_tokens={self.train.pack_tokens} cannot hold the longest row: "
                f"data.max_prompt_tokens + 2 * rollout.max_length{self._head_term()} = {longest}; raise train.pack_tokens"
            )

    def _validate_model(self) -> None:
        """The checks that need the student's architecture."""
        if self.diffusion.mask_token_id is not None:
            self.diffusion.check_vocab(self.model.vocab_size)
        if self.teacher.vocab_size < self.model.vocab_size:
            raise ConfigError(
                f"teacher_model.vocab_size={self.teacher.vocab_size} is below model.vocab_size={self.model.vocab_size}: "
                "the student's rows past the teacher's would have no teacher probability; distill into a student "
                "whose vocabulary is at most the teacher's (a larger teacher's extra padding rows are dropped)"
            )
        self.parallel.check_model(self.model, "model")
        if self.teacher_model is not None or self.parallel.teacher is not None:
            self.parallel.check_teacher(self.teacher)
        if self.distill.top_k is not None and self.distill.top_k > self.model.vocab_size:
            raise ConfigError(f"distill.top_k={self.distill.top_k} exceeds model.vocab_size={self.model.vocab_size}")
        longest = self.longest_row
        if longest is not None and longest > self.model.max_position_embeddings:
            raise ConfigError(
                f"rows are [prompt | x0 | xt]: data.max_prompt_tokens + 2 * rollout.max_length{self._head_term()} = {longest} "
                f"exceeds model.max_position_embeddings={self.model.max_position_embeddings}"
            )


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass, with unknown keys refused


def to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _dataclass_of(tp: Any) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is Union:
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def config_keys(cls: type = None, prefix: str = "") -> list[str]:
    """Every dotted key a config file or a ``key=value`` override can set (default: ``RunConfig``'s),
    in field order: the names users' YAML files and command lines depend on."""
    cls = RunConfig if cls is None else cls
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        sub = _dataclass_of(hints[f.name])
        out += config_keys(sub, f"{prefix}{f.name}.") if sub is not None else [prefix + f.name]
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and, for numbers written as strings such as '3e-3', convert) a scalar value."""
    if value is None:
        if typing.get_origin(hint) is Union and type(None) in typing.get_args(hint):
            return None
        if hint is Any:
            return None
        raise ConfigError(f"{where} must not be null")
    if typing.get_origin(hint) is Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], where)
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    container = typing.get_origin(hint)
    if container is dict and not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping (e.g. {where}={{key: value}}), got {value!r}")
    if container in (list, tuple) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list (e.g. {where}=[a, b]), got {value!r}")
    return value


def _section(value: Any, sub: type, hint: Any, where: str) -> Any:
    """A section's value that is not a mapping: None where the section is optional, else refused
    (``train=5`` used to reach the code as an int and end in an AttributeError)."""
    optional = typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)
    if (value is None and optional) or isinstance(value, sub):
        return value
    first = next(f.name for f in dataclasses.fields(sub) if f.init)
    raise ConfigError(f"'{where}' is a section, not a value: set its keys (e.g. {where}.{first}=...), "
                      f"got {value!r}")


def _check_key(cls: type, key: Any, path: str) -> None:
    """``key`` is a field of ``cls``, else a ConfigError naming the closest one."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    if key not in names:
        close = difflib.get_close_matches(str(key), sorted(names), n=1)
        hint = f"; did you mean '{path}{close[0]}'?" if close else f"; valid keys: {sorted(names)}"
        raise ConfigError(f"unknown config key '{path}{key}'{hint}")


def check_keys(cls: type, data: Any, path: str = "") -> None:
    """Every key of a (partial) config dict is a key of ``cls``: an overlay's typo is named with its
    file before it is merged with anything."""
    if not isinstance(data, dict):
        return
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        _check_key(cls, key, path)
        sub = _dataclass_of(hints[key])
        if sub is not None:
            check_keys(sub, value, f"{path}{key}.")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming the closest key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}{key}"
        _check_key(cls, key, path)
        sub = _dataclass_of(hints[key])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value, where + ".")
        elif sub is not None:
            value = _section(value, sub, hints[key], where)
        else:
            value = _coerce(value, hints[key], where)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{path.rstrip('.') or cls.__name__}: {e}") from None


def _yaml_problem(err: Exception) -> str:
    """A YAML error in one line: the problem and where (``did not find ... at line 2, column 4``)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _override(item: str) -> Any:
    """One ``a.b.c=value`` override as an omegaconf node (the value read as YAML, an empty value as the
    empty string, ``${...}`` kept for resolution against the whole config)."""
    from omegaconf import OmegaConf

    if "=" not in item or not item.split("=", 1)[0].strip():
        raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=10)")
    key, raw = item.split("=", 1)
    try:
        return OmegaConf.from_dotlist([f"{key.strip()}={raw}" if raw != "" else f"{key.strip()}=''"])
    except Exception as err:  # yaml's or omegaconf's parser: either way the value is unreadable
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)}); quote "
                          "a string value, e.g. key='[text'") from None


def _resolved(node: Any, what: str) -> dict[str, Any]:
    """A merged omegaconf tree as plain dicts, every ``${...}`` interpolation resolved."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"{what}: cannot resolve {key or 'an interpolation'} "
                          f"({str(err).splitlines()[0]})") from None


def merge(base: dict[str, Any], overlays: Sequence[str] = (), overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``base`` with the partial YAML files ``overlays`` merged on top in order, then the ``key=value``
    ``overrides``; ``${...}`` in any of them is resolved against the result (``train.save_dir=runs/${name}``).

    Merging follows omegaconf: a mapping merges key by key, anything else (a list, a value) replaces.
    Each overlay's and override's keys are checked first, so that a typo is named with its source.
    """
    from omegaconf import OmegaConf

    merged = OmegaConf.create(base)
    for path in overlays:
        layer = _read_yaml(path)
        with _named(path):
            check_keys(RunConfig, OmegaConf.to_container(layer, resolve=False))
        merged = _merge(merged, layer)
    for item in overrides:
        layer = _override(item)
        check_keys(RunConfig, OmegaConf.to_container(layer, resolve=False))
        merged = _merge(merged, layer)
    return _resolved(merged, "config" if not overlays else f"config with {', '.join(overlays)}")


def _merge(base: Any, layer: Any) -> Any:
    """``OmegaConf.merge``, except that a list or a value where the config has a section (``data=[1]``)
    replaces it instead of raising omegaconf's TypeError, so that the schema (``from_dict``) names it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(base, layer)
    except (TypeError, ValueError, OmegaConfBaseException):
        def put(node: dict, new: dict) -> None:
            for key, value in new.items():
                if isinstance(value, dict) and isinstance(node.get(key), dict):
                    put(node[key], value)
                else:
                    node[key] = value

        plain = OmegaConf.to_container(base, resolve=False)
        put(plain, OmegaConf.to_container(layer, resolve=False))
        return OmegaConf.create(plain)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (YAML-parsed values, ``${...}`` resolved) to a config dict, in place."""
    out = merge(data, overrides=overrides)
    data.clear()
    data.update(out)
    return data


@contextlib.contextmanager
def _named(source: str) -> Iterator[None]:
    """A ConfigError raised inside names ``source`` (the YAML file it came from)."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _read_yaml(path: str) -> Any:
    """A YAML file as an omegaconf mapping, interpolations not yet resolved; a syntax error names the
    line, every other problem the file."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({err})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...), "
                          f"got a {type(OmegaConf.to_container(node)).__name__}")
    return node


REQUIRED_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig)
                          if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
"""What a whole config must set (a partial one is an overlay: ``--config`` on top of a recipe)."""


def _check_whole(data: dict[str, Any], source: str) -> None:
    if not data:
        raise ConfigError(f"{source} is empty: a config needs at least diffusion: (and model: or init: weights to read it from)")
    missing = [k for k in REQUIRED_SECTIONS if k not in data]
    if missing:
        sections = " and ".join(f"{k}:" for k in missing)
        raise ConfigError(f"{source} has no {sections}, so it is not a whole config; to change a few keys of a "
                          f"recipe, apply it on top of one: --recipe RECIPE --config {source}")


def load_yaml(path: str) -> RunConfig:
    """A whole RunConfig from a YAML file; every error names the file."""
    data = _resolved(_read_yaml(path), path)
    _check_whole(data, path)
    with _named(path):
        return from_dict(RunConfig, data)


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML config file as a plain dict, ``${...}`` interpolations kept (``compose`` resolves them)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(_read_yaml(path), resolve=False) or {}


def compose(base: dict[str, Any], overlays: Sequence[str] = (), overrides: Sequence[str] = (), *,
            whole_yaml: Optional[str] = None) -> RunConfig:
    """``base`` (a recipe's dict, or a whole YAML file's: ``whole_yaml`` names it, and its errors
    then name the file), then partial YAML ``overlays``, then ``key=value`` overrides (``merge``
    says how they combine) -> a validated RunConfig, completed from its files
    (``RunConfig.complete``: a model left out is read from the weights). Choosing the base from
    what ``--recipe`` says is ``recipes.lookup.resolve``'s job."""
    data = merge(base, overlays, overrides)
    if whole_yaml is not None:
        _check_whole(data, whole_yaml)
    with _named(whole_yaml) if whole_yaml is not None else contextlib.nullcontext():
        return from_dict(RunConfig, data).complete()


def dump_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = [
    "RunConfig", "InitConfig", "RolloutConfig", "DistillConfig", "OptimConfig", "TrainConfig",
    "ModelConfig", "DiffusionConfig", "ParallelLayout", "PromptDataConfig", "RopeScaling",
    "ConfigError", "from_dict", "to_dict", "apply_overrides", "merge", "load_yaml", "read_yaml", "compose", "dump_yaml",
    "config_keys",
]
