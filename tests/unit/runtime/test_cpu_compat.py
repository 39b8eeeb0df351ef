"""What keeps one code path working on megatron-core 0.16 (CI, CPU) and 0.19 (GPU machines), and on
gloo/CPU as well as NCCL/GPU: device placement of micro-batches and collectives, and the refusal of
a checkpoint the installed megatron-core cannot read (docs/compatibility.md)."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
from megatron.core import dist_checkpointing

from nemo_opdlm.checkpoint.errors import CheckpointFileError
from nemo_opdlm.checkpoint.format import check_readable
from nemo_opdlm.runtime.comm import collective_device
from nemo_opdlm.runtime.pipeline import model_device, to_device

READS_COMMON_PT_ONLY = "common_strategy" in inspect.signature(dist_checkpointing.load).parameters


def _fake_checkpoint(path: str, with_common_pt: bool) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1}, f)
    if with_common_pt:
        torch.save({}, os.path.join(path, "common.pt"))
    return path


def test_to_device_moves_tensors_and_keeps_the_rest():
    batch = {"input_ids": torch.arange(6).view(2, 3), "name": "row", "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"]  # already there: no copy
    assert moved["name"] == "row" and moved["n"] == 3
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters


def test_to_device_moves_rows_to_another_device():
    """Rows built on the CPU go to the model's device (here the ``meta`` device stands in for a
    GPU: a real move, without one), their tensors only; the originals stay where they were."""
    rows = {"x0": torch.ones(2, 3), "n": 3}
    moved = to_device(rows, torch.device("meta"))
    assert moved["x0"].device.type == "meta" and moved["x0"].shape == (2, 3) and moved["n"] == 3
    assert rows["x0"].device.type == "cpu"


def test_collective_device_without_process_group_is_cpu():
    assert not torch.distributed.is_initialized()
    assert collective_device() == torch.device("cpu")


def test_check_readable(tmp_path):
    with pytest.raises(CheckpointFileError, match="no metadata.json"):
        check_readable(str(tmp_path))
    check_readable(_fake_checkpoint(str(tmp_path / "legacy"), with_common_pt=True))  # 0.16 format: both read it
    newer = _fake_checkpoint(str(tmp_path / "newer"), with_common_pt=False)  # the >= 0.17 layout
    if READS_COMMON_PT_ONLY:
        with pytest.raises(CheckpointFileError, match="megatron-core >= 0.17"):
            check_readable(newer)
    else:
        check_readable(newer)


def test_a_removed_common_pt_is_damage_not_a_newer_megatron(tmp_path):
    """A checkpoint this megatron-core wrote, with common.pt deleted: named as a missing file (it
    was diagnosed as 'written by megatron-core >= 0.17'); the intact copy loads."""
    from nemo_opdlm.checkpoint.format import load_dist_checkpoint, save_dist_checkpoint
    from nemo_opdlm.models.student import build_chunks
    from nemo_opdlm.runtime.distributed import ParallelLayout, runtime
    from tests.tiny import tiny_model

    with runtime(ParallelLayout()) as rt:
        chunks = build_chunks(tiny_model(), rt.ctx)
        ckpt = str(tmp_path / "ckpt")
        save_dist_checkpoint(chunks, tiny_model(), ckpt)
        load_dist_checkpoint(chunks, ckpt)
        if not os.path.isfile(os.path.join(ckpt, "common.pt")):
            pytest.skip("this megatron-core writes no common.pt")
        os.remove(os.path.join(ckpt, "common.pt"))
        with pytest.raises(CheckpointFileError, match="common.pt is missing"):
            load_dist_checkpoint(chunks, ckpt)
