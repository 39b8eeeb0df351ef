"""An lm-evaluation-harness model backed by the rollout sampler, so harness tasks run on the student.

One job: answer the harness's ``generate_until`` requests by decoding with
``rollout.sampler.BlockSampler`` (block diffusion, static or dynamic, or AR for the teacher) and
cutting each generation at its stop strings. Likelihood requests are refused with a clear error: a
block-diffusion student has no left-to-right likelihood (use generation tasks such as gsm8k,
minerva_math, humaneval). Non-goals: loading task data (the harness does that).

Importable without ``lm_eval``: :class:`SamplerLM` holds the logic; when ``lm_eval`` is
importable, :func:`harness_class` builds the subclass of ``lm_eval.api.model.LM`` and registers it
as ``opdlm`` (after lm-eval's own models, which registering first would hide). lm-eval 0.4.13 does
not discover plugin models, so its ``lm_eval`` command does not know ``opdlm``: run
``opdlm lm-eval --model opdlm --model_args hf=<dir>,mode=dynamic,threshold=0.9 --tasks ...``
(``eval/lm_eval_cli.py``), or import this module before calling ``lm_eval.simple_evaluate``.
``hf`` may be an AR model or a student exported by ``tools/export_hf.py``; ``ckpt`` a megatron-core
checkpoint (a trainer's ``step_N`` carries its tokenizer). Run single-process (TP=PP=1); from
Python, pass already built ``chunks`` and ``tokenizer``.

What the harness reports: ``get_model_info`` adds the decoding settings and the tokens decoded
per denoising round (``tokens_per_round``: valid tokens / rounds the rows needed) to the results'
``config``; a progress bar counts requests while generating.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any, Optional, Sequence

from nemo_opdlm.data.prompts import eos_ids, left_pad, pad_id
from nemo_opdlm.eval.evaluate import DecodeSettings, decode_responses
from nemo_opdlm.eval.tasks import truncate_at
from nemo_opdlm.models.config import decoding_diffusion
from nemo_opdlm.rollout.sampler import BlockSampler

TOKENIZER_ARG = "the opdlm model arg tokenizer=DIR"

MODEL_NAME = "opdlm"
LOGLIKELIHOOD_ERROR = (
    "the opdlm lm-eval model only generates (generate_until): a block-diffusion student has no "
    "left-to-right log-likelihood; choose generation tasks (e.g. gsm8k, minerva_math500, humaneval), "
    "or evaluate the AR teacher with lm-eval's 'hf' model"
)


def _request_args(request: Any) -> tuple[str, dict]:
    """``(context, gen_kwargs)`` of a harness Instance (``.args``) or of a plain tuple."""
    args = getattr(request, "args", request)
    context, gen_kwargs = args[0], (args[1] if len(args) > 1 else {})
    return context, dict(gen_kwargs or {})


class SamplerLM:
    """Generation through the block sampler for harness-style requests.

    Args:
        chunks: the model chunks (e.g. from ``loading.load_model``); or ``hf``/``ckpt`` to load them
            here (starts a one-process runtime).
        tokenizer: a transformers tokenizer (or ``tokenizer`` path when loading).
        settings: decoding settings (``mode``, ``block_size``, ``threshold``, ...); keyword
            arguments named like :class:`DecodeSettings` fields override them.
        mask_token_id: the student's [MASK] id (not needed for mode='ar').
        shift_logits: the student predicts token i at position i - 1 (default: the checkpoint's
            diffusion metadata when loading, else False).
        block_grid: where its blocks fall (default: the checkpoint's record when loading, else the
            default grid); ``allow_grid_mismatch`` lets it differ from the record.
    """

    def __init__(self, chunks: Optional[Sequence[Any]] = None, tokenizer: Any = None, *,
                 settings: Optional[DecodeSettings] = None, mask_token_id: Optional[int] = None,
                 shift_logits: Optional[bool] = None, block_grid: Optional[str] = None,
                 allow_grid_mismatch: bool = False, hf: Optional[str] = None, ckpt: Optional[str] = None,
                 **kwargs: Any) -> None:
        if chunks is None:
            if not (hf or ckpt):
                raise ValueError("SamplerLM needs model chunks, or hf=<HF dir> / ckpt=<checkpoint dir> to load")
            from nemo_opdlm.eval.loading import load_model, start_single_runtime

            parallel = start_single_runtime()
            loaded = load_model(parallel, hf=hf, ckpt=ckpt, tokenizer=tokenizer if isinstance(tokenizer, str) else None,
                                mask_token_id=_coerce(mask_token_id), shift_logits=_coerce(shift_logits),
                                block_grid=block_grid, allow_grid_mismatch=bool(_coerce(allow_grid_mismatch)),
                                tokenizer_arg=TOKENIZER_ARG)
            chunks, tokenizer, mask_token_id = loaded.chunks, loaded.tokenizer, loaded.mask_token_id
            shift_logits, block_grid = loaded.shift_logits, loaded.block_grid
            if loaded.note:
                print(loaded.note, file=sys.stderr)
            if "block_size" not in kwargs and loaded.block_size:
                kwargs["block_size"] = loaded.block_size
        if tokenizer is None or isinstance(tokenizer, str):
            raise ValueError(f"SamplerLM needs a tokenizer object with model chunks ({TOKENIZER_ARG} when loading)")
        fields = {k: _coerce(v) for k, v in kwargs.items() if k in DecodeSettings.__dataclass_fields__}
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise ValueError(f"unknown opdlm model arguments {unknown}; valid: "
                             f"{sorted(DecodeSettings.__dataclass_fields__) + ['hf', 'ckpt', 'tokenizer', 'mask_token_id', 'shift_logits', 'block_grid', 'allow_grid_mismatch']}")
        self.settings = replace(settings or DecodeSettings(), **fields)
        self.chunks = list(chunks)
        self.tokenizer = tokenizer
        mask = mask_token_id if mask_token_id is not None else getattr(tokenizer, "mask_token_id", None)
        self.diffusion = decoding_diffusion(mask, bool(_coerce(shift_logits)), self.settings.block_size, block_grid)
        self.eos = eos_ids(tokenizer)
        self.pad = pad_id(tokenizer)
        self.tokens_generated = 0
        self.row_rounds = 0
        """Valid tokens decoded and rounds the rows needed, over every ``generate_until`` call."""

    # --- harness API -----------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """One continuation per request, cut at its ``until`` strings; order preserved.

        Requests with equal generation settings are decoded in batches of ``settings.batch_size``;
        a progress bar (unless ``disable_tqdm``) counts requests and shows the tokens per round.
        """
        from tqdm import tqdm

        parsed = [_request_args(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, (_, kw) in enumerate(parsed):
            groups.setdefault(self._group_key(kw), []).append(i)
        out: list[Optional[str]] = [None] * len(parsed)
        bar = tqdm(total=len(parsed), desc="opdlm generate_until", disable=disable_tqdm)
        for key, idx in groups.items():
            settings = replace(self.settings, max_new_tokens=key[0], temperature=key[1]).for_model(self.diffusion)
            sampler = BlockSampler(self.chunks, settings.sampler_config(
                diffusion=self.diffusion, eos_token_ids=self.eos, pad_token_id=self.pad))
            for lo in range(0, len(idx), settings.batch_size):
                batch = idx[lo: lo + settings.batch_size]
                enc = self.tokenizer([parsed[i][0] for i in batch], add_special_tokens=False)["input_ids"]
                ids, lens = left_pad(enc, self.pad)
                rollout = sampler.generate(ids, lens)
                self.tokens_generated += int(rollout.valid.sum())
                self.row_rounds += rollout.row_rounds
                for i, text in zip(batch, decode_responses(rollout, self.tokenizer, self.eos)):
                    out[i] = truncate_at(text, _until(parsed[i][1]))
                bar.update(len(batch))
                bar.set_postfix(tok_per_round=f"{self.tokens_per_round:.2f}")
        bar.close()
        return [o if o is not None else "" for o in out]

    @property
    def tokens_per_round(self) -> float:
        """Valid tokens per denoising round the rows needed, over everything generated so far."""
        return self.tokens_generated / max(self.row_rounds, 1)

    def get_model_info(self) -> dict[str, Any]:
        """Added by lm-eval to its results' ``config``: how the model decoded and how parallel it was."""
        grid = None if self.diffusion is None or self.settings.mode == "ar" else self.diffusion.block_grid
        return {"opdlm_decoding": self.settings.describe(), "block_grid": grid,
                "tokens_per_round": round(self.tokens_per_round, 4),
                "tokens_generated": self.tokens_generated, "denoising_rounds": self.row_rounds}

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        raise NotImplementedError(LOGLIKELIHOOD_ERROR)

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
        raise NotImplementedError(LOGLIKELIHOOD_ERROR)

    # --- helpers ---------------------------------------------------------------------------
    def _group_key(self, gen_kwargs: dict) -> tuple[int, float]:
        max_new = int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.settings.max_new_tokens)))
        temperature = float(gen_kwargs.get("temperature", self.settings.temperature))
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        return max_new, temperature

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "opdlm"))

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def _until(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def _coerce(value: Any) -> Any:
    """lm-eval passes model_args as strings: '0.9' -> 0.9, '4' -> 4, 'true' -> True."""
    if not isinstance(value, str):
        return value
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def harness_class() -> Optional[type]:
    """The registered ``lm_eval`` model class, or None when lm_eval is not installed."""
    try:
        import lm_eval.models  # noqa: F401  lm-eval's own models first: registering before them hides them
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        return None

    class OPDLMHarnessLM(SamplerLM, LM):  # type: ignore[misc, valid-type]
        """``lm_eval --model opdlm --model_args hf=DIR,mode=dynamic,threshold=0.9,block_size=4``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            LM.__init__(self)
            # the harness adds these to every model's arguments
            if str(kwargs.get("batch_size")).startswith("auto") or kwargs.get("batch_size") is None:
                kwargs.pop("batch_size", None)
            for name in ("device", "max_batch_size"):
                kwargs.pop(name, None)
            SamplerLM.__init__(self, *args, **kwargs)

    try:
        return register_model(MODEL_NAME)(OPDLMHarnessLM)
    except (AssertionError, ValueError):  # already registered (module imported twice)
        return OPDLMHarnessLM


HarnessLM = harness_class()
