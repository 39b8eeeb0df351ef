"""The SDAR layout: an exported student that SGLang, lmdeploy and JetEngine serve.

One job: say whether a student fits the layout those engines load, and write what differs from the
default (``opdlm``) export: config.json (``SDARForCausalLM`` / ``model_type`` ``sdar``, Qwen3's fields
under Qwen3's names, the student's own facts as extra fields), the remote-code files
(``configuration_sdar.py``, ``modeling_sdar.py`` and the ``modeling_opdlm.py`` they import), the
``<|MASK|>`` token text and the model card's serving section. Weights keep Qwen3's names, as in the
default export. Non-goals: writing weights (``mcore_to_hf.py``), the tokenizer and generation
config (``export_assets.py``).

What the engines read (their own source, late 2026; ``docs/serving.md``):

- SGLang 0.5 turns its diffusion path on for ``architectures[0] == 'SDARForCausalLM'``, with the
  [MASK] id fixed at 151669; block size and threshold come from ``--dllm-algorithm-config``.
- lmdeploy's PyTorch engine turns its dLLM paradigm on for ``model_type`` ``sdar``, [MASK] 151669.
- JetEngine needs ``'sdar' in model_type`` and takes the [MASK] id as an argument (or the
  tokenizer's mask token).
- All of them apply q/k norms (Qwen3's decoder), read the logits at the masked positions themselves
  (no shift), and cut blocks from position 0 (the ``absolute`` grid).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from nemo_opdlm.convert.errors import ServingLayoutError
from nemo_opdlm.convert import hf_config as hfc
from nemo_opdlm.convert.hf_config import SDAR_ARCHITECTURE
from nemo_opdlm.models.config import DiffusionConfig, ModelConfig
from nemo_opdlm.models.families import FAMILIES

EXPORT_FORMATS = ("opdlm", "sdar")
"""``tools/export_hf.py --format``: this project's own layout (the default), or SDAR's."""
SDAR_MODEL_TYPE = "sdar"
SDAR_MASK_TOKEN_ID = 151669
"""The [MASK] id SGLang and lmdeploy hard-code (the first id past Qwen3's tokenizer)."""
SDAR_MASK_TOKEN = "<|MASK|>"
"""The mask token's text in SDAR's tokenizers (JetEngine reads ``tokenizer.mask_token_id``)."""
SDAR_GRID = "absolute"
"""The block grid every engine decodes on."""
HF_MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")
SDAR_FILES = ("configuration_sdar.py", "modeling_sdar.py", "modeling_opdlm.py")
"""The remote-code files an SDAR export ships (``modeling_sdar.py`` imports ``modeling_opdlm.py``)."""


def check_sdar_export(cfg: ModelConfig, diffusion: DiffusionConfig, allow_grid_mismatch: bool = False) -> Optional[str]:
    """Refuse, one reason at a time, a student the engines would load wrongly; returns the model
    card's warning when ``allow_grid_mismatch`` lets a response-grid student through (else None).

    Raises :class:`ServingLayoutError` for: a family without q/k norms (the engines always apply
    them), a [MASK] id other than 151669 (hard-coded in SGLang and lmdeploy), shifted logits (the
    engines read a position's own logits), and a student trained on the response grid (the engines
    decode on the absolute grid) unless ``allow_grid_mismatch``."""
    if cfg.family != "qwen3":
        raise ServingLayoutError(
            f"--format sdar: the student is a {FAMILIES[cfg.family].architecture}, but the SDAR layout is Qwen3's "
            "(SGLang, lmdeploy and JetEngine always apply q/k norms, which it lacks): export it with --format opdlm, "
            "or convert a Qwen3 model")
    if diffusion.mask_token_id != SDAR_MASK_TOKEN_ID:
        raise ServingLayoutError(
            f"--format sdar: the student's [MASK] id is {diffusion.mask_token_id}, but SGLang and lmdeploy hard-code "
            f"{SDAR_MASK_TOKEN_ID}: train it with diffusion.mask_token_id={SDAR_MASK_TOKEN_ID}, or export it with "
            "--format opdlm")
    if diffusion.shift_logits:
        raise ServingLayoutError(
            "--format sdar: the student predicts token i at position i - 1 (diffusion.shift_logits=true), but the "
            "engines read each masked position's own logits: train it with diffusion.shift_logits=false, or export "
            "it with --format opdlm")
    if diffusion.block_grid != SDAR_GRID:
        if not allow_grid_mismatch:
            raise ServingLayoutError(
                f"--format sdar: the student was trained on the {diffusion.block_grid!r} block grid, but the engines "
                f"decode on the {SDAR_GRID!r} grid, so they would feed it states it never saw whenever the prompt "
                f"length is not a multiple of the block size: train it with diffusion.block_grid={SDAR_GRID}, or pass "
                "--allow-grid-mismatch to export it anyway (the model card then says so)")
        return grid_warning(diffusion.block_grid)
    return None


def grid_warning(grid: str) -> str:
    """The model card's warning for a student exported against its grid."""
    return (f"**Warning: block-grid mismatch.** This student was trained on the `{grid}` block grid, but "
            f"SGLang, lmdeploy and JetEngine decode on the `{SDAR_GRID}` grid (blocks cut from position 0). "
            "Whenever a prompt's length is not a multiple of the block size they feed it states it never saw, "
            "and its accuracy there is unmeasured. It was exported with `--allow-grid-mismatch`; its own "
            f"`generate` (transformers) decodes on `{grid}`, as it was trained. Train with "
            f"`diffusion.block_grid={SDAR_GRID}` to serve it on these engines.")


def sdar_hf_config(cfg: ModelConfig, diffusion: DiffusionConfig, source: Optional[dict[str, Any]],
                   dtype: str) -> dict[str, Any]:
    """config.json of an SDAR-format export: what ``configuration_sdar.SDARConfig`` reads (Qwen3's
    fields and the student's ``mask_token_id`` / ``block_size`` / ``block_grid`` / ``shift_logits``).

    ``torch_dtype`` is the spelling transformers 4.x (the engines' pin) and JetEngine read;
    ``dtype`` is transformers 5's. The source's token ids are kept."""
    source = source or {}
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    out: dict[str, Any] = {
        "architectures": [SDAR_ARCHITECTURE],
        "model_type": SDAR_MODEL_TYPE,
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        **hfc.shape_fields(cfg),
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        "mask_token_id": diffusion.mask_token_id,
        "block_size": diffusion.block_size,
        "block_grid": diffusion.block_grid,
        "shift_logits": diffusion.shift_logits,
        "source_architecture": FAMILIES[cfg.family].architecture,
    }
    out.update({k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source})
    return out


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """What the engines are told at launch: the block size, and their greedy unmasking rule."""

    block_size: int
    steps_per_block: int
    threshold: Optional[float]
    """None: static decoding (SGLang: threshold 1.0, one token per round)."""

    @property
    def sglang_threshold(self) -> float:
        """SGLang's LowConfidence unmasks every position above the threshold, else the single most
        confident one: 1.0 is static decoding at one token per round."""
        return 1.0 if self.threshold is None else self.threshold

    @property
    def lmdeploy_strategy(self) -> str:
        """lmdeploy's and JetEngine's name of the rule (they share the names)."""
        return "low_confidence_static" if self.threshold is None else "low_confidence_dynamic"


def serve_commands(directory: str, s: ServeSettings) -> dict[str, str]:
    """``{engine: what to run}`` for SGLang, lmdeploy and JetEngine serving ``directory`` greedily."""
    threshold = s.threshold if s.threshold is not None else 0.9
    sglang = "\n".join([
        "cat > sdar_decoding.yaml <<'EOF'",
        f"block_size: {s.block_size}",
        f"threshold: {s.sglang_threshold}",
        "EOF",
        f"python -m sglang.launch_server --model-path {directory} --trust-remote-code \\",
        "    --dllm-algorithm LowConfidence --dllm-algorithm-config sdar_decoding.yaml",
    ])
    lmdeploy = "\n".join([
        "from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline",
        f"pipe = pipeline({directory!r}, backend_config=PytorchEngineConfig(",
        f"    dllm_block_length={s.block_size}, dllm_denoising_steps={s.steps_per_block},",
        f"    dllm_unmasking_strategy={s.lmdeploy_strategy!r}, dllm_confidence_threshold={threshold}))",
        "print(pipe([\"...\"], gen_config=GenerationConfig(max_new_tokens=256, do_sample=False)))",
    ])
    jetengine = "\n".join([
        "from jetengine import LLM, SamplingParams",
        f"llm = LLM({directory!r}, mask_token_id={SDAR_MASK_TOKEN_ID}, block_length={s.block_size})",
        f"params = SamplingParams(temperature=1.0, topk=1, topp=1.0, max_tokens=256, block_length={s.block_size},",
        f"                        denoising_steps={s.steps_per_block}, remasking_strategy={s.lmdeploy_strategy!r}, "
        f"dynamic_threshold={threshold})",
        "print(llm.generate([\"...\"], params)[0][\"text\"])",
    ])
    return {"sglang": sglang, "lmdeploy": lmdeploy, "jetengine": jetengine}


def serve_section(s: ServeSettings, facts_lines: list[str]) -> str:
    """The model card's "Serve it" and "Trained with" sections (markdown)."""
    commands = serve_commands("PATH", s)
    lines = [
        "## Serve it",
        "",
        f"The directory is in the SDAR layout (`{SDAR_ARCHITECTURE}`, `model_type: {SDAR_MODEL_TYPE}`, Qwen3 tensor "
        f"names, `{SDAR_MASK_TOKEN}` at id {SDAR_MASK_TOKEN_ID}), which these engines serve with `trust_remote_code`. "
        "Replace `PATH` with this directory. Each decodes greedily on the absolute block grid.",
        "",
        "SGLang (OpenAI-compatible server; block size and threshold from the YAML file):",
        "",
        "```bash",
        commands["sglang"],
        "```",
        "",
        "lmdeploy (PyTorch engine):",
        "",
        "```python",
        commands["lmdeploy"],
        "```",
        "",
        "JetEngine:",
        "",
        "```python",
        commands["jetengine"],
        "```",
        "",
        "Their unmasking rules match `generate`'s at one token per round (static) and with a threshold: "
        "SGLang unmasks every position above its threshold, else the most confident one; lmdeploy's "
        "`low_confidence_dynamic` keeps positions at or above it (`generate`: strictly above).",
    ]
    if s.steps_per_block != s.block_size:
        lines += ["", f"This export's default is {s.steps_per_block} rounds per block of {s.block_size}: SGLang's "
                  "LowConfidence has no such static schedule (its floor is one token per round)."]
    lines += ["", "## Trained with", "", "| setting | value |", "|---|---|", *facts_lines]
    return "\n".join(lines)
