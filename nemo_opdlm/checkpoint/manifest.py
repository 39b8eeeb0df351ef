"""``manifest.json``: every file of a checkpoint with its size and digest, written at save, checked at load.

One job: tell an intact checkpoint from a damaged one (a file missing, truncated, cut short by a full
disk, or with bytes overwritten) and name the first damaged file, before a loader meets it as a bare
``EOFError`` or silently wrong weights. Non-goals: what the checkpoint holds (``format.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

MANIFEST = "manifest.json"
"""Every file of a checkpoint with its size and BLAKE2b digest, written at save, checked at load."""


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(ckpt_dir):
        out += [os.path.relpath(os.path.join(root, n), ckpt_dir) for n in names if n != MANIFEST]
    return sorted(out)


def write_manifest(ckpt_dir: str) -> None:
    """``manifest.json``: the size and BLAKE2b digest of every file of the checkpoint."""
    files = {name: {"bytes": os.path.getsize(os.path.join(ckpt_dir, name)), "blake2b": _digest(os.path.join(ckpt_dir, name))}
             for name in _files(ckpt_dir)}
    with open(os.path.join(ckpt_dir, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)


def damage(ckpt_dir: str) -> Optional[str]:
    """What is wrong with a checkpoint's files against its manifest (None: intact, or a checkpoint
    written before manifests existed). Names the first damaged file: missing, of another size
    (truncated, or a full disk), or of other content (bytes overwritten)."""
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"{path} is unreadable ({err})"
    for name, want in files.items():
        full = os.path.join(ckpt_dir, name)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != want["bytes"]:
            return f"{full} has {size} bytes, {want['bytes']} when saved (truncated or cut short)"
        if _digest(full) != want["blake2b"]:
            return f"{full} differs from what was saved (its checksum does not match): the file is damaged"
    return None
