import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


def pytest_collection_modifyitems(config, items):
    """GPU-marked tests (``tests/gpu``) need CUDA: without it each is skipped, saying so, rather than
    run on a CPU where what they check (compiled backward, CUDA memory) does not exist."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: benchmarks/gpu_check.sh runs it on one GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def single_rank():
    """A one-process gloo runtime with megatron-core groups (TP=PP=1), torn down after the module."""
    from nemo_opdlm.runtime.distributed import ParallelLayout, init_runtime, shutdown_runtime

    rt = init_runtime(ParallelLayout(), seed=1234, environ={})
    yield rt
    shutdown_runtime()


@pytest.fixture(scope="module")
def shared_runtime():
    """The runtime this process already runs (another module's), else a one-process one (TP=PP=1,
    seed 1) that this module owns and tears down after it."""
    from nemo_opdlm.runtime.distributed import ParallelLayout, current_runtime, init_runtime, shutdown_runtime

    rt = current_runtime()
    owned = rt is None
    if owned:
        rt = init_runtime(ParallelLayout(), seed=1, environ={})
    yield rt
    if owned:
        shutdown_runtime()
