"""The self-contained modeling file copied next to exported students (``modeling_opdlm.py``).

It is shipped as package data and must not import ``nemo_opdlm``; nothing here imports it.
"""
