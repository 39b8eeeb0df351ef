"""The installed recipes as YAML files: ``opdlm recipes --export recipes/``.

One job: render each Python recipe as the file a NeMo-RL user expects to read and copy
(``recipes/<name>.yaml``), and read back the one fact a YAML body cannot hold (the cluster it is
sized for, kept in a header comment so ``opdlm plan`` checks a YAML recipe on the right cluster).
The Python recipes stay the one source: each body is exactly ``opdlm train --recipe NAME
--print-config``, and ``tests/unit/config/test_recipe_files.py`` fails when a committed file differs.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from nemo_opdlm.config import dump_yaml

MARKER = "# Written by `opdlm recipes --export`"
"""The header line that marks a file as an export (only such files are replaced or removed)."""
CLUSTER_LINE = re.compile(r"^# cluster: (\d+) x (\d+) (\S+)\s*$")


def recipe_yaml(name: str) -> str:
    """The file for the installed recipe ``name``: a header of comments, then the resolved config."""
    from nemo_opdlm.recipes.lookup import resolve, table

    info = {row.spec.rpartition(":")[2]: row for row in table()}[name]
    header = [
        f"# {info.spec}: {info.summary}",
        f"# cluster: {info.cluster}",
        f"{MARKER} from the Python recipe {info.spec} (the source: edit a copy, not this file).",
        f"# Use: opdlm train --config recipes/{name}.yaml key=value ...   (opdlm plan recipes/{name}.yaml first)",
    ]
    return "\n".join(header) + "\n" + dump_yaml(resolve(info.spec))


def export(directory: str) -> tuple[list[str], list[str]]:
    """Write every installed recipe to ``directory/<name>.yaml`` (each atomically) and remove earlier
    exports whose recipe is gone; returns (written, removed) paths. Files without the marker are the
    user's and stay untouched."""
    from nemo_opdlm.recipes.lookup import installed

    os.makedirs(directory, exist_ok=True)
    names = sorted(installed())
    written = []
    for name in names:
        path = os.path.join(directory, f"{name}.yaml")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(recipe_yaml(name))
        os.replace(tmp, path)
        written.append(path)
    removed = stale_exports(directory, names)
    for path in removed:
        os.remove(path)
    return written, removed


def stale_exports(directory: str, names: list[str]) -> list[str]:
    """Exported files in ``directory`` whose recipe is not among ``names``."""
    out = []
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if entry.endswith(".yaml") and entry[:-5] not in names and _is_export(path):
            out.append(path)
    return out


def _is_export(path: str) -> bool:
    with open(path) as f:
        return any(line.startswith(MARKER) for line in f.readlines()[:8])


def yaml_cluster(path: str) -> Optional[tuple[int, int, str]]:
    """(nodes, GPUs per node, GPU kind) from a YAML recipe's ``# cluster:`` header line, or None."""
    try:
        with open(path) as f:
            for line in f:
                if not line.startswith("#"):
                    break
                match = CLUSTER_LINE.match(line)
                if match:
                    return int(match[1]), int(match[2]), match[3]
    except OSError:
        return None
    return None
