"""How a run config is put together: recipe, then partial YAML overlays, then ``key=value`` overrides,
``${...}`` resolved over the result (omegaconf's merge and dotlist), and how ``--recipe`` is found."""

from __future__ import annotations

import pytest

from nemo_opdlm.config import ConfigError, to_dict
from nemo_opdlm.recipes.lookup import load_recipe, resolve
from nemo_opdlm.recipes import lookup

RECIPE = "tiny:tiny_self_tp1_pp1_2g"


def test_interpolation_in_overrides_resolves_against_the_final_config():
    cfg = resolve(RECIPE, ["name=exp7", "train.save_dir=/ckpt/${name}/run", "optim.min_lr=${optim.lr}",
                           "optim.lr=3e-3"])
    assert cfg.train.save_dir == "/ckpt/exp7/run"
    assert cfg.optim.min_lr == cfg.optim.lr == 0.003  # resolved after the later override, as omegaconf does
    with pytest.raises(ConfigError, match=r"cannot resolve train.save_dir .*'nope' not found"):
        resolve(RECIPE, ["train.save_dir=${nope}"])


def test_partial_yaml_overlays_merge_on_a_recipe_in_order(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("train:\n  steps: 7\n  save_dir: runs/${name}-a\noptim:\n  lr: 2.0e-3\n")
    second = tmp_path / "b.yaml"
    second.write_text("name: mine\nrollout: {max_length_by_domain: {code: 12}}\ndata: {domain_field: domain}\n")
    cfg = resolve(RECIPE, ["train.steps=9"], [str(first), str(second)])
    base = load_recipe(RECIPE)
    assert (cfg.train.steps, cfg.optim.lr, cfg.name) == (9, 2e-3, "mine")  # overrides win over overlays
    assert cfg.train.save_dir == "runs/mine-a"  # ${name} sees the later overlay's name
    assert cfg.rollout.max_length_by_domain == {"code": 12}
    # everything the overlays do not name keeps the recipe's value
    assert cfg.optim.min_lr == base.optim.min_lr and cfg.model == base.model and cfg.data.path == base.data.path
    assert to_dict(resolve(RECIPE, [], [])) == to_dict(base)


def test_overlay_typo_and_partial_yaml_as_recipe_are_named(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'optim.lrr'; did you mean 'optim.lr'"):
        resolve(RECIPE, [], [str(typo)])
    part = tmp_path / "part.yaml"
    part.write_text("train: {steps: 3}\n")
    with pytest.raises(ConfigError, match=r"part.yaml has no diffusion:.*--config .*part.yaml"):
        resolve(str(part), [])


def test_whole_yaml_config_takes_overlays_and_overrides(tmp_path):
    from nemo_opdlm.config import dump_yaml

    whole = tmp_path / "run.yaml"
    whole.write_text(dump_yaml(load_recipe(RECIPE)).replace("name: tiny_self_tp1_pp1_2g", "name: ${train.seed}x"))
    over = tmp_path / "o.yaml"
    over.write_text("train: {seed: 5}\n")
    cfg = resolve(str(whole), ["train.steps=4"], [str(over)])
    assert (cfg.name, cfg.train.steps, cfg.train.seed) == ("5x", 4, 5)


@pytest.mark.parametrize("spec,needle", [
    ("tiny", "names a module, not a recipe: choose one of tiny:tiny_4l_to_2l_tp1_pp1_2g"),
    ("qwen3", "names a module, not a recipe: choose one of qwen3:qwen3_0_6b_self_"),
    ("tiny:tiny_self_tp1", "did you mean 'tiny_self_tp1_pp1_2g' or 'tiny_self_tp1_pp2_2g'"),
    ("qwen:qwen3_8b_self_tp2_pp1_8g", "recipe module 'qwen' not found; did you mean 'qwen3'"),
    ("qwen3_8b_self", "no recipe named 'qwen3_8b_self'; did you mean 'qwen3_8b_self_tp2_pp1_8g'"),
    ("llama31:qwen3_8b_self_tp2_pp1_8g", "it is qwen3:qwen3_8b_self_tp2_pp1_8g"),
    ("tiny:tiny_shape", "--recipe tiny:tiny_shape is a model config"),  # a helper of the module, not a recipe
])
def test_recipe_misspellings_suggest_names(spec, needle):
    with pytest.raises(ConfigError) as err:
        load_recipe(spec)
    assert needle in str(err.value)


@pytest.mark.parametrize("spec", ["tiny:tiny_self_tp1_pp1_2g", "tiny.tiny_self_tp1_pp1_2g", "tiny_self_tp1_pp1_2g",
                                  "recipes.tiny:tiny_self_tp1_pp1_2g", "recipes:tiny_self_tp1_pp1_2g",
                                  "nemo_opdlm.recipes.tiny:tiny_self_tp1_pp1_2g"])
def test_every_spelling_finds_the_recipe(spec):
    assert load_recipe(spec).name == "tiny_self_tp1_pp1_2g"


def test_a_recipe_module_of_the_users_own(tmp_path, monkeypatch):
    (tmp_path / "my_recipes.py").write_text(
        "from nemo_opdlm.config import RunConfig\n"
        "from nemo_opdlm.recipes.tiny import tiny_run\n\n"
        "def mine() -> RunConfig:\n    return tiny_run('mine', top_k=2)\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe(str(tmp_path / "my_recipes.py") + ":mine").distill.top_k == 2
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_recipe("my_recipes:mine").name == "mine"
    with pytest.raises(ConfigError, match="recipe 'mne' not in my_recipes; did you mean 'mine'"):
        load_recipe("my_recipes:mne")


def test_recipe_table_lists_every_installed_recipe_with_its_cluster():
    rows = {r.spec: r for r in lookup.table()}
    assert len(rows) == len(lookup.installed()) >= 19
    assert rows["qwen3:qwen3_8b_self_tp2_pp1_16g"].cluster == "2 x 8 h100-80g"
    assert rows["tiny:tiny_self_tp1_pp1_2g"].summary.startswith("Self-distillation, DP=2")
    for spec in rows:
        assert load_recipe(spec).name == spec.split(":")[1]
