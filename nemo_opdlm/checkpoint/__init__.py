"""The checkpoint wing: the megatron-core checkpoint on disk, and the run directory that holds them.

What it is: the one format every part of the package reads and writes (the HF importer and
exporter, the trainer, evaluation): torch_dist files of the model chunks that any TP/PP/VPP layout
loads, with the vocabulary re-cut between layouts, the model description and HF assets beside them
(``format.py``); the size and digest of every file, written at save and checked before a load
(``manifest.py``); directories written to a staging name and renamed into place, so a target is
complete or absent (``staging.py``); and the trainer's ``save_dir``: its lock, the ``step_N``
checkpoints, the ``latest`` pointer and where a run resumes (``run_dir.py``). Its errors are
``errors.py``'s.

What it is not: Hugging Face <-> megatron conversion stays in ``convert/`` (which calls into this
wing to write and read the megatron side), and the training state's save and resume (optimizer,
LR schedule, data cursor, step) stays in ``training/checkpoint.py``, which calls into this wing. It
imports only ``errors``, ``runtime`` and ``models`` (the model description, ``models/describe.py``).
"""
