"""A built wheel, installed (not editable) into a fresh virtual environment, runs from any directory.

The recipes used to live in the checkout's ``recipes/`` folder, which a wheel does not contain: an
installed ``opdlm plan`` found none of them. This builds the wheel from a copy of the sources,
installs it into a venv under the test's temporary directory (``--system-site-packages`` plus a
``.pth`` to this interpreter's site-packages, so torch and megatron-core are not downloaded; the
editable install there is not activated by that path), and runs the installed console script from
a directory that holds no sources.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from importlib import metadata

import pytest

from tests.dist import ROOT


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """(the venv's bin directory, an environment without this checkout on PYTHONPATH)."""
    pytest.importorskip("setuptools")  # --no-build-isolation builds with this environment's setuptools
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "nemo_opdlm"), src / "nemo_opdlm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)])
    (wheel,) = (tmp / "dist").glob("nemo_opdlm-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    bin_dir = venv / "bin"
    purelib = _run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    with open(os.path.join(purelib.stdout.strip(), "outer_site.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps", "-q", str(wheel)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPDLM_DEBUG")}
    return str(bin_dir), env


def test_installed_wheel_plans_a_recipe_from_another_directory(installed, tmp_path):
    bin_dir, env = installed
    where = _run([os.path.join(bin_dir, "python"), "-c", "import nemo_opdlm; print(nemo_opdlm.__file__)"],
                 cwd=tmp_path, env=env).stdout.strip()
    assert where.startswith(os.path.dirname(bin_dir)) and "site-packages" in where  # the wheel, not a checkout
    out = _run([os.path.join(bin_dir, "opdlm"), "plan", "tiny:tiny_self_tp1_pp1_2g"], cwd=tmp_path, env=env)
    assert out.stdout.rstrip().endswith("ok"), out.stdout
    listed = _run([os.path.join(bin_dir, "opdlm"), "recipes"], cwd=tmp_path, env=env).stdout
    assert "qwen3:qwen3_8b_self_tp2_pp1_8g" in listed and "tiny:tiny_self_tp1_pp1_2g" in listed
    version = _run([os.path.join(bin_dir, "opdlm"), "--version"], cwd=tmp_path, env=env).stdout
    assert version.strip() == f"nemo-opdlm {metadata.version('nemo-opdlm')}"
