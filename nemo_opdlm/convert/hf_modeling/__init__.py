"""The self-contained modeling files copied next to exported students: ``modeling_opdlm.py`` (both
formats), and for the SDAR format ``configuration_sdar.py`` and ``modeling_sdar.py``.

They are shipped as package data and must not import ``nemo_opdlm``; nothing here imports them.
"""
