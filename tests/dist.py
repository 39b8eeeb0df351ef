"""Launch test workers under torchrun (gloo), the way users launch the real jobs.

A worker is a module-level function ``fn(tmp_dir: str)`` in a test module; it asserts inside the
processes, and a failing rank makes the torchrun exit code non-zero, which fails the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_TAKEN = ("EADDRINUSE", "Address already in use", "address already in use")


def torchrun(target: str, nproc: int, tmp_dir: str, timeout: int = 300) -> str:
    """Run ``module:function`` on ``nproc`` ranks; return combined output (raises on failure).

    The rendezvous port is picked free just before launch; if another job grabs it in between,
    the launch is retried once on a new port (only for that error).
    """
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
               os.path.join(ROOT, "tests", "dist_worker.py"), target, str(tmp_dir)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or not any(m in out for m in PORT_TAKEN):
            break
    if proc.returncode != 0:
        raise AssertionError(f"{target} failed on {nproc} ranks (exit {proc.returncode}):\n{out[-6000:]}")
    return out
