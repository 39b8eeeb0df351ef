"""nemo-opdlm: autoregressive-to-block-diffusion LM conversion by on-policy distillation."""

__version__ = "0.1.0"
