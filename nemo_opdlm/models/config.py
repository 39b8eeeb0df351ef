"""Model-provider config: the architecture of a Qwen3 / Qwen2.5 / Llama-3 style decoder.

One job: hold an architecture's numbers, validate them, and turn them into a megatron-core
``TransformerConfig`` for a given parallel layout (the role Megatron-Bridge's model providers play,
without depending on it). Non-goals: building modules (``student.py``, ``teacher.py``), parallel
layout validation against the world size (``runtime/distributed.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from nemo_opdlm.errors import ConfigError  # noqa: F401  (re-exported: the historical import path)
from nemo_opdlm.models.families import FAMILIES
from nemo_opdlm.models.grid import GRIDS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION_BACKENDS = ("auto", "local", "sdpa", "flex")
LINEAR_IMPLS = ("auto", "local", "te")
RECOMPUTE = ("none", "selective", "full")
FP8 = (None, "auto", "hybrid", "e4m3")




@dataclass(kw_only=True)
class RopeScaling:
    """Llama-3.1 style RoPE frequency scaling (``rope_scaling`` with ``rope_type: llama3`` in HF)."""

    factor: float = 8.0
    """Scale of the low frequencies."""
    low_freq_factor: float = 1.0
    """Wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Context length the base model was trained at."""


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a decoder-only LM with RMSNorm, SwiGLU, GQA and RoPE."""

    family: str = "qwen3"
    """'qwen3', 'qwen2' or 'llama': the HF architecture this shape comes from (names tensors on export)."""
    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    ffn_hidden_size: int
    """SwiGLU inner width."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """Key/value heads (GQA groups); equal to num_attention_heads for MHA."""
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    vocab_size: int
    """Tokenizer vocabulary size (before padding to a TP-friendly multiple)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of lcm(this, TP): the padded size does not change with TP
    (up to this number), so checkpoints reshard across TP layouts. Padding is masked from every softmax."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is used at (rows are [prompt | x0 | xt], so up to P + 2L)."""
    rotary_base: float = 1_000_000.0
    """RoPE theta."""
    rope_scaling: Optional[RopeScaling] = None
    """Llama-3.1 RoPE scaling, or None."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    add_qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2/2.5)."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the output layer."""
    init_method_std: float = 0.02
    """Std of random initialisation (weights are normally imported)."""
    params_dtype: str = "float32"
    """'float32', 'bfloat16' or 'float16'."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    attention_backend: str = "auto"
    """'auto' (flex on GPU, sdpa on CPU), 'local' (megatron-core dense reference), 'sdpa', 'flex'."""
    linear_impl: str = "auto"
    """'auto' (Transformer Engine when importable and on GPU), 'local' or 'te'."""
    fp8: Optional[str] = None
    """FP8 recipe passed to TE ('hybrid' or 'e4m3'; needs linear_impl te), or 'auto': 'hybrid' where
    Transformer Engine is importable and the GPU is Hopper or newer, else off. 'auto' is resolved
    where the model is built (``resolved_fp8``), so a recipe is the same config on a login node
    and on the GPUs it runs on."""
    recompute: str = "none"
    """Activation recompute: 'none', 'selective' (core attention) or 'full' (every layer)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further TransformerConfig keyword arguments, passed through verbatim."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]

    def validate(self) -> None:
        """Raise ConfigError naming the first inconsistent field."""
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "vocab_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family must be one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({self.num_query_groups})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}); set model.head_dim"
            )
        if self.kv_channels % 2:
            raise ConfigError(f"model head_dim must be even for RoPE, got {self.kv_channels}")
        if self.params_dtype not in DTYPES:
            raise ConfigError(f"model.params_dtype must be one of {sorted(DTYPES)}, got {self.params_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"model.attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}"
            )
        if self.linear_impl not in LINEAR_IMPLS:
            raise ConfigError(f"model.linear_impl must be one of {LINEAR_IMPLS}, got {self.linear_impl!r}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"model.recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.fp8 not in FP8:
            raise ConfigError(f"model.fp8 must be one of {FP8}, got {self.fp8!r}")
        if self.fp8 not in (None, "auto") and self.resolved_linear_impl() != "te":
            raise ConfigError("model.fp8 needs Transformer Engine: set model.linear_impl=te (and install it)")
        if self.resolved_linear_impl() == "te" and not te_available():
            raise ConfigError("model.linear_impl=te but transformer_engine is not importable")

    def padded_vocab_size(self, tp_size: int) -> int:
        """Vocabulary rounded up to a multiple of ``lcm(make_vocab_size_divisible_by, tp_size)``."""
        multiple = math.lcm(self.make_vocab_size_divisible_by, tp_size)
        return -(-self.vocab_size // multiple) * multiple

    def resolved_attention_backend(self, on_gpu: Optional[bool] = None) -> str:
        """The attention back end: 'auto' is flex on a GPU (where FlexAttention imports), sdpa on a
        CPU. ``on_gpu``: whether the model runs on a GPU (None: this machine's answer; a login node
        planning a GPU job passes True)."""
        if self.attention_backend != "auto":
            return self.attention_backend
        from nemo_opdlm.models.attention import flex_available

        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        return "flex" if on_gpu and flex_available() else "sdpa"

    def resolved_linear_impl(self) -> str:
        if self.linear_impl != "auto":
            return self.linear_impl
        return "te" if torch.cuda.is_available() and te_available() else "local"

    def resolved_fp8(self, fp8_capable: Optional[bool] = None) -> Optional[str]:
        """The FP8 recipe: 'auto' is 'hybrid' (e4m3 forward, e5m2 backward) where FP8 GEMMs run,
        else None. ``fp8_capable``: whether they run there (Transformer Engine's linear layers on a
        GPU of compute capability >= 8.9: Hopper, Ada); None: this machine's answer (a login node
        planning a GPU job passes the GPU kind's)."""
        if self.fp8 != "auto":
            return self.fp8
        if fp8_capable is None:
            fp8_capable = (self.resolved_linear_impl() == "te" and torch.cuda.is_available()
                           and torch.cuda.get_device_capability() >= (8, 9))
        return "hybrid" if fp8_capable else None

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def transformer_config(self, *, tp_size: int, pp_size: int, use_cpu_initialization: bool):
        """The megatron-core ``TransformerConfig`` of this architecture at a TP/PP layout."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        dtype = self.dtype
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            attention_dropout=self.attention_dropout,
            hidden_dropout=self.hidden_dropout,
            init_method_std=self.init_method_std,
            tensor_model_parallel_size=tp_size,
            pipeline_model_parallel_size=pp_size,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            pipeline_dtype=dtype,
            use_cpu_initialization=use_cpu_initialization,
            # Fusions need apex/TE kernels; the unfused paths are exact and portable.
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            bias_dropout_fusion=False,
            attention_softmax_in_fp32=True,
        )
        if self.recompute == "full":
            kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        elif self.recompute == "selective":
            kwargs.update(recompute_granularity="selective")
        fp8 = self.resolved_fp8()
        if fp8 is not None:
            kwargs.update(fp8=fp8)
        kwargs.update(self.extra)
        return TransformerConfig(**kwargs)


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(kw_only=True)
class DiffusionConfig:
    """What turns the AR architecture into a block-diffusion student."""

    block_size: int = 4
    """Tokens per diffusion block; 1 with an x0-only row is the causal teacher."""
    mask_token_id: Optional[int] = None
    """Id of the [MASK] token: an id no text uses (a reserved special token, or an embedding row no
    token maps to). None: the tokenizer's mask token, read when the run starts
    (``RunConfig.complete``); a tokenizer without one needs the id set. An id a real token uses (an
    ordinary token, EOS, an end-of-turn or chat-template token) is refused."""
    shift_logits: bool = False
    """Where the student reads its prediction of response token i. False (the paper): at position
    i itself. True (AR-aligned, as Dream and Fast-dLLM v2 convert AR models): at position i - 1,
    the previous token of the same block, or for a block's first token the last token of the
    clean context before it (the previous block, or the prompt). The teacher's weights already
    predict the next token there, so the student starts near its teacher: on the demo's tiny
    teacher the initial KL at a block's first position falls from 5.3 to 0.23 nats
    (``docs/conversion.md``). Training, rollouts, evaluation and the Hugging Face export all
    follow this setting."""
    block_grid: str = "absolute"
    """Where blocks fall (``models/grid.py``): 'absolute', blocks cut from position 0, as SGLang,
    lmdeploy and JetEngine serve SDAR models (the first denoising block holds the prompt's last
    ``P mod block_size`` tokens, clean and never masked, and the first response tokens); or
    'response', blocks counted from the response's first token (the paper's training rows).
    Rollouts, training states, evaluation and the exports all follow it, and a checkpoint records
    it (one saved before this setting existed reads as 'response'). The default is the engines'
    grid: a student trained on the response grid and served on theirs fell from 0.98 to 0.24
    (arithmetic) and from 0.97 to 0.66 (sort) under threshold decoding, while training on the
    absolute grid kept 0.95 and 0.98 (``docs/conversion.md``, ``grid_efficiency.json``)."""

    def __post_init__(self) -> None:
        if self.block_grid not in GRIDS:
            raise ConfigError(f"diffusion.block_grid must be one of {GRIDS}, got {self.block_grid!r}")
        if self.block_size < 1:
            raise ConfigError(f"diffusion.block_size must be >= 1, got {self.block_size}")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise ConfigError(f"diffusion.mask_token_id must be >= 0, got {self.mask_token_id}")

    def check_vocab(self, vocab_size: int) -> None:
        """The [MASK] id must be a row of the embedding (``vocab_size`` rows)."""
        if self.mask_token_id is None:
            raise ConfigError("diffusion.mask_token_id is not set: set it, or point init.tokenizer at a tokenizer "
                              "with a mask token")
        check_mask_in_vocab(self.mask_token_id, vocab_size, "diffusion.mask_token_id")


def decoding_diffusion(mask_token_id: Optional[int], shift_logits: bool, block_size: Optional[int] = None,
                       block_grid: Optional[str] = None) -> Optional[DiffusionConfig]:
    """A model read for block-diffusion decoding (its block size and grid, else the defaults), or
    None when no [MASK] id is known: an AR model, decoded autoregressively only."""
    if mask_token_id is None:
        return None
    known = {k: v for k, v in (("block_size", block_size), ("block_grid", block_grid)) if v is not None}
    return DiffusionConfig(mask_token_id=mask_token_id, shift_logits=shift_logits, **known)


def check_mask_in_vocab(mask_token_id: int, vocab_size: int, source: str) -> None:
    """A [MASK] id (named by ``source``: a config key, a flag, a checkpoint's metadata) must be a
    row of the model's embedding."""
    if not 0 <= mask_token_id < vocab_size:
        raise ConfigError(f"the [MASK] id {mask_token_id} ({source}) is outside the model's vocabulary (ids 0.."
                          f"{vocab_size - 1}): use the tokenizer's mask token, a reserved special token or an "
                          "unused embedding row (the id the student was trained with)")
