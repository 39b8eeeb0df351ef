"""A block-diffusion student exported by nemo_opdlm in the SDAR layout, for ``trust_remote_code``.

One job: name the exported student as the engines that serve SDAR models expect it
(``SDARForCausalLM`` / ``SDARModel`` with :class:`SDARConfig`), so that ``transformers`` loads the
same directory that SGLang, lmdeploy and JetEngine serve. The decoder and ``generate`` are
``modeling_opdlm.py``'s, shipped beside this file (``transformers`` copies a relative import's file
with it): Qwen3's tensor names, block-diffusion attention, and decoding on the grid in
``config.block_grid`` (the engines' grid is ``absolute``: blocks cut from position 0). Imports
nothing from nemo_opdlm.
"""

from __future__ import annotations

from .configuration_sdar import SDARConfig
from .modeling_opdlm import OPDLMBlockDiffusionLM, OPDLMModel


def check_supported(config: SDARConfig) -> None:
    """Refuse, by name, the Qwen3 features the shared decoder does not implement (an export never
    writes them; a hand-edited config.json might)."""
    if config.hidden_act != "silu":
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported: only 'silu' (SwiGLU)")
    if config.attention_bias:
        raise ValueError("attention_bias=true is not supported (Qwen3 would put a bias on o_proj too)")
    if config.use_sliding_window:
        raise ValueError("use_sliding_window=true is not supported: every layer attends to the full context")
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope_scaling of type {rope_type!r} is not supported (only plain RoPE and 'llama3')")


class SDARModel(OPDLMModel):
    """The decoder without its LM head (``AutoModel``): hidden states under block-diffusion metadata."""

    config_class = SDARConfig

    def __init__(self, config: SDARConfig) -> None:
        check_supported(config)
        super().__init__(config)


class SDARForCausalLM(OPDLMBlockDiffusionLM):
    """The student (``AutoModelForCausalLM``): ``forward`` under block-diffusion metadata, and
    ``generate`` (see ``modeling_opdlm.OPDLMBlockDiffusionLM.generate``)."""

    config_class = SDARConfig

    def __init__(self, config: SDARConfig) -> None:
        check_supported(config)
        super().__init__(config)
