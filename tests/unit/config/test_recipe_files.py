"""The repository's ``recipes/*.yaml`` are the Python recipes, exactly (issue 26 item 1).

Each file's body must equal ``opdlm train --recipe NAME --print-config``; a file that differs, is
missing, or outlived its recipe fails here with the one command that rewrites them all. A YAML
recipe must also work where a recipe name does: ``--config FILE key=value``, ``opdlm plan FILE`` on
its own cluster, and the Slurm scripts (``tests/e2e/test_slurm.py``).
"""

from __future__ import annotations

import os

import pytest

from nemo_opdlm import cli
from nemo_opdlm.config import ConfigError, dump_yaml, to_dict
from nemo_opdlm.plan.cli import recipe_cluster
from nemo_opdlm.plan.layout import Cluster
from nemo_opdlm.recipes import ALL_RECIPES, CLUSTERS
from nemo_opdlm.recipes.export import MARKER, export, recipe_yaml
from nemo_opdlm.recipes.lookup import resolve
from tests.dist import ROOT

RECIPES_DIR = os.path.join(ROOT, "recipes")
REMEDY = "run `opdlm recipes --export recipes/` and commit the result"


def _body(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


@pytest.mark.parametrize("name", sorted(ALL_RECIPES))
def test_each_file_is_its_python_recipe(name):
    path = os.path.join(RECIPES_DIR, f"{name}.yaml")
    assert os.path.isfile(path), f"recipes/{name}.yaml is missing: {REMEDY}"
    with open(path) as f:
        text = f.read()
    assert text == recipe_yaml(name), f"recipes/{name}.yaml differs from its Python recipe: {REMEDY}"
    assert _body(text) == dump_yaml(resolve(name)), "the body is what --print-config prints"


def test_no_file_without_a_recipe():
    extra = sorted(f for f in os.listdir(RECIPES_DIR) if f.endswith(".yaml") and f[:-5] not in ALL_RECIPES)
    assert not extra, f"recipes/ holds {extra} with no Python recipe: {REMEDY}"


def test_print_config_is_the_file_body(capsys):
    assert cli.main(["train", "--recipe", "tiny_self_tp1_pp1_2g", "--print-config"]) == 0
    with open(os.path.join(RECIPES_DIR, "tiny_self_tp1_pp1_2g.yaml")) as f:
        assert capsys.readouterr().out == _body(f.read()) + "\n"  # print() adds one newline


@pytest.mark.parametrize("name", ["qwen3_8b_self_tp2_pp1_8g", "tiny_4l_to_2l_tp1_pp1_2g"])
def test_config_file_takes_overrides_like_the_recipe(name):
    path = os.path.join(RECIPES_DIR, f"{name}.yaml")
    overrides = ["train.steps=7", "rollout.threshold=0.8"]
    from_file = resolve(None, overrides, [path])
    assert to_dict(from_file) == to_dict(resolve(name, overrides))
    assert from_file.train.steps == 7 and from_file.rollout.threshold == 0.8


def test_plan_reads_the_cluster_from_the_header():
    for name, shape in CLUSTERS.items():
        path = os.path.join(RECIPES_DIR, f"{name}.yaml")
        expected = Cluster(shape.nodes, shape.gpus_per_node, shape.gpu)
        assert recipe_cluster(path) == expected == recipe_cluster(name), name


def test_plan_and_train_take_a_config_file_without_recipe(capsys):
    path = os.path.join(RECIPES_DIR, "qwen3_8b_self_tp2_pp1_8g.yaml")
    assert cli.main(["plan", "--config", path, "train.steps=30", "--get", "train.steps", "--get", "parallel.tp"]) == 0
    assert capsys.readouterr().out.split() == ["30", "2"]
    assert cli.main(["train", "--config", path, "train.steps=30", "--print-config"]) == 0
    assert "  steps: 30\n" in capsys.readouterr().out


def test_no_recipe_and_no_config_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"no config given: name a recipe \(`opdlm recipes` lists them: opdlm train --recipe NAME, opdlm plan NAME\) or a whole YAML config \(--config recipes/NAME.yaml\)"):
        resolve(None, ["train.steps=3"], [])
    with pytest.raises(ConfigError, match=r"--config part.txt: without --recipe the first --config is the whole"):
        resolve(None, [], ["part.txt"])


def test_export_replaces_its_own_files_and_leaves_the_users(tmp_path):
    mine = tmp_path / "my_run.yaml"
    mine.write_text("name: mine\n")
    stale = tmp_path / "retired_recipe.yaml"
    stale.write_text(f"{MARKER} from the Python recipe tiny:retired_recipe\nname: retired_recipe\n")
    (tmp_path / "tiny_self_tp1_pp1_2g.yaml").write_text("outdated\n")
    written, removed = export(str(tmp_path))
    assert len(written) == len(ALL_RECIPES) and removed == [str(stale)]
    assert mine.read_text() == "name: mine\n" and not stale.exists()
    assert (tmp_path / "tiny_self_tp1_pp1_2g.yaml").read_text() == recipe_yaml("tiny_self_tp1_pp1_2g")
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
