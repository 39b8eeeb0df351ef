"""Launcher environments, layout validation (before anything is built), and the CPU compat layer."""

import os

import pytest
import torch

from nemo_opdlm.runtime.distributed import (
    LayoutError,
    ParallelLayout,
    expand_hostlist,
    first_slurm_host,
    init_runtime,
    read_launch_env,
)
from tests.tiny import tiny_model


def test_torchrun_and_slurm_environments():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                           "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3, 8, 1, "n1", 1234, "torchrun")
    env = read_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        5, 16, 5, "gpu007", 14242, "slurm")
    assert read_launch_env({}).launcher == "single"


@pytest.mark.parametrize("nodelist,hosts", [
    ("node01", ["node01"]),
    ("x12,x13", ["x12", "x13"]),
    ("gpu[003-005,009]", ["gpu003", "gpu004", "gpu005", "gpu009"]),
    ("a[1,4],b[2-3]", ["a1", "a4", "b2", "b3"]),
    # several bracket groups: their product, the last varying fastest (scontrol's order)
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("r[2]n[9-11]", ["r2n9", "r2n10", "r2n11"]),
    # zero padding from the lower bound, carried past a power of ten
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("gpu[1-2]-ib,login", ["gpu1-ib", "gpu2-ib", "login"]),
    ("dgx-[07,10-11].cluster", ["dgx-07.cluster", "dgx-10.cluster", "dgx-11.cluster"]),
])
def test_slurm_hostlist_expansion(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts
    assert first_slurm_host(nodelist, scontrol=None) == hosts[0]


@pytest.mark.parametrize("bad", ["n[1-", "n[3-1]", "n[a-b]", "n]1[", "a,,b", "n[[1]]"])
def test_slurm_hostlist_errors(bad):
    with pytest.raises(ValueError, match="Slurm hostlist"):
        expand_hostlist(bad)


def test_first_slurm_host_asks_scontrol_first(tmp_path):
    """scontrol, when present, is what answers; an scontrol that fails or prints nothing falls back."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "%s\\n" "fromslurm-$3" other\n')
    fake.chmod(0o755)
    assert first_slurm_host("rack[1-2]-node[01-02]", scontrol=str(fake)) == "fromslurm-rack[1-2]-node[01-02]"
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/bash\nexit 1\n")
    broken.chmod(0o755)
    assert first_slurm_host("rack[1-2]-node[01-02]", scontrol=str(broken)) == "rack1-node01"
    assert first_slurm_host("rack[1-2]-node[01-02]", scontrol=str(tmp_path / "absent")) == "rack1-node01"


def test_layout_errors_name_the_numbers():
    model = tiny_model(num_layers=6, num_attention_heads=8, num_query_groups=2, hidden_size=64)
    with pytest.raises(LayoutError, match=r"num_query_groups=2 is not divisible by parallel.tp=4"):
        ParallelLayout(tp=4).check_model(model, "teacher")
    with pytest.raises(LayoutError, match=r"num_attention_heads=8 is not divisible by parallel.tp=3"):
        ParallelLayout(tp=3).check_model(model)
    with pytest.raises(LayoutError, match=r"num_layers=6 is not divisible by parallel.pp=4"):
        ParallelLayout(pp=4).check_model(model)
    with pytest.raises(LayoutError, match=r"num_layers=4 is not divisible by parallel.pp \* vpp=6"):
        ParallelLayout(pp=2, vpp=3).check_model(tiny_model(num_layers=4))
    ParallelLayout(pp=2, vpp=3).check_model(tiny_model(num_layers=6))
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by tp\*pp\*cp = 2\*2\*1 = 4"):
        ParallelLayout(tp=2, pp=2).dp(6)
    with pytest.raises(LayoutError, match="parallel.tp must be >= 1"):
        ParallelLayout(tp=0)
    with pytest.raises(LayoutError, match="context parallelism"):
        ParallelLayout(cp=2)
    assert ParallelLayout(tp=2, pp=2).dp(8) == 2


def test_teacher_layout_errors_name_parallel_teacher():
    """``parallel.teacher``: the teacher's own TP/PP is checked against the teacher and the world."""
    from nemo_opdlm.runtime.distributed import TeacherLayout

    layout = ParallelLayout(tp=1, teacher=TeacherLayout(tp=4))
    with pytest.raises(LayoutError, match=r"teacher_model.num_query_groups=2 is not divisible by parallel.teacher.tp=4"):
        layout.check_teacher(tiny_model(num_attention_heads=8, num_query_groups=2, hidden_size=64))
    layout.check_model(tiny_model(num_attention_heads=8, num_query_groups=2, hidden_size=64))  # the student: TP=1
    with pytest.raises(LayoutError, match=r"world size 6 is not divisible by the teacher's tp\*pp = 4\*1"):
        layout.dp(6)
    assert layout.dp(8) == 8 and layout.teacher_dp(8) == 2
    with pytest.raises(LayoutError, match="parallel.teacher.pp must be >= 1"):
        TeacherLayout(pp=0)
    assert ParallelLayout(tp=2).teacher_layout() == ParallelLayout(tp=2)  # shared: the student's


def test_init_runtime_fails_before_building():
    """A bad layout fails on validation: no process group is created, nothing waits for peers."""
    env = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(LayoutError, match="world size 3"):
        init_runtime(ParallelLayout(tp=2), environ=env)
    env["WORLD_SIZE"] = "2"
    with pytest.raises(LayoutError, match="student.num_query_groups=3 is not divisible by parallel.tp=2"):
        init_runtime(ParallelLayout(tp=2), environ=env,
                     models=(("student", tiny_model(num_attention_heads=6, num_query_groups=3, head_dim=16)),))
    assert not torch.distributed.is_initialized()


def test_cpu_compat_layer(single_rank):
    """On a CPU-only build the CUDA assumptions of megatron-core map to the CPU (see cpu_compat)."""
    from megatron.core import tensor_parallel

    from nemo_opdlm.runtime.cpu_compat import cpu_compat_enabled, enable_cpu_compat

    assert cpu_compat_enabled() and enable_cpu_compat()  # idempotent
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    # the RNG tracker's model-parallel stream differs from the default stream and is reproducible
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    default = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4), default)
    assert not torch.equal(a, b) and not torch.equal(a, default)


def test_cpu_compat_checks_its_footing(monkeypatch):
    """A replaced symbol that is gone, or a megatron-core stand-in whose parameters changed, stops
    the layer with the symbol and the versions named (instead of a silent no-op)."""
    import megatron.core
    from megatron.core.tensor_parallel import random as mcore_random

    from nemo_opdlm.runtime import cpu_compat as C

    patches = C._patches(C._CudaToCpuMode())
    C.check_footing(patches)  # the installed torch and megatron-core are what the layer expects
    monkeypatch.delattr(torch.cuda, "empty_cache", raising=False)
    with pytest.raises(RuntimeError, match=r"empty_cache does not exist.*megatron-core " + megatron.core.__version__):
        C.check_footing(patches)
    monkeypatch.undo()

    def renamed(state, device=-1, graph_safe=False):
        return None

    monkeypatch.setattr(mcore_random, "_set_cuda_rng_state", renamed)
    with pytest.raises(RuntimeError, match=r"_set_cuda_rng_state takes \('state', 'device', 'graph_safe'\)"):
        C.check_footing(patches)


def test_cpu_compat_scope_restores_everything(tmp_path):
    """``with cpu_compat():`` turns the layer on for a block and restores every original after it
    (a fresh process: the suite's runtime keeps the layer on for its whole life)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch.overrides import _get_current_function_mode_stack as stack\n"
        "from megatron.core.tensor_parallel import random as r\n"
        "from nemo_opdlm.runtime.cpu_compat import cpu_compat, cpu_compat_enabled\n"
        "before = (torch.cuda.current_device, torch.Tensor.type, r._set_cuda_rng_state, len(stack()))\n"
        "with cpu_compat() as on:\n"
        "    assert on and cpu_compat_enabled()\n"
        "    assert torch.zeros(1, device='cuda').device.type == 'cpu' and torch.ones(1).type() == 'torch.cuda.FloatTensor'\n"
        "after = (torch.cuda.current_device, torch.Tensor.type, r._set_cuda_rng_state, len(stack()))\n"
        "assert after == before and not cpu_compat_enabled(), (before, after)\n"
        "assert torch.ones(1).type() == 'torch.FloatTensor'\n"
        "print('SCOPED_OK')\n"
    )
    if torch.cuda.is_available():
        pytest.skip("the layer only exists without CUDA")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert "SCOPED_OK" in out.stdout, out.stderr[-3000:]
