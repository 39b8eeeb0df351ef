"""Staged directories: a target is written completely or not at all, a full disk is named, --overwrite
replaces only what the writer itself writes."""

from __future__ import annotations

import os

import pytest

from nemo_opdlm.checkpoint.errors import TargetExistsError
from nemo_opdlm.checkpoint.staging import OutputKind, staged_dir


def test_staged_dir_is_all_or_nothing(tmp_path):
    target = str(tmp_path / "out")
    with staged_dir(target, overwrite=False) as st:
        open(os.path.join(st, "a"), "w").write("1")
    assert os.listdir(target) == ["a"]
    with pytest.raises(TargetExistsError, match="--overwrite"):
        with staged_dir(target, overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with staged_dir(target, overwrite=True) as st:
            open(os.path.join(st, "b"), "w").write("2")
            raise RuntimeError("half-way")
    assert os.listdir(target) == ["a"]  # the previous complete version survives
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging left behind
    with staged_dir(target, overwrite=True) as st:
        open(os.path.join(st, "b"), "w").write("2")
    assert os.listdir(target) == ["b"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_staged_dir_names_a_full_disk_and_guards_other_files(tmp_path):
    """A writer's ENOSPC (here wrapped, as megatron wraps it) is re-raised as ENOSPC naming the
    target; --overwrite of a directory holding files the writer does not write is refused."""
    import errno

    target = str(tmp_path / "out")
    with pytest.raises(OSError) as info:
        with staged_dir(target, overwrite=False):
            try:
                raise OSError(errno.ENOSPC, "No space left on device", "shard")
            except OSError as err:
                raise RuntimeError("unexpected pos 704 vs 598") from err
    assert info.value.errno == errno.ENOSPC and info.value.filename == target
    assert "unexpected pos 704 vs 598" in info.value.strerror and os.listdir(tmp_path) == []
    kind = OutputKind("thing", ("a", "*.bin"))
    os.makedirs(target)
    for name in ("a", "x.bin", "notes.txt"):
        open(os.path.join(target, name), "w").write("1")
    with pytest.raises(TargetExistsError, match="out is not a previous thing: it holds 1 entry one does not "
                                                r"\(notes.txt\), which --overwrite would delete"):
        with staged_dir(target, overwrite=True, kind=kind):
            pass
    os.remove(os.path.join(target, "notes.txt"))
    with staged_dir(target, overwrite=True, kind=kind) as st:
        open(os.path.join(st, "b.bin"), "w").write("2")
    assert os.listdir(target) == ["b.bin"]
