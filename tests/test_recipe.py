"""recipe.py / registry.py: validation before work, errors that name file, path and problem."""

from __future__ import annotations

import pytest

from onnxcomp.errors import OnnxcompError
from onnxcomp.passes.cleanup import CleanupConfig
from onnxcomp.recipe import load_recipe, parse_recipe, shipped_recipes
from onnxcomp.registry import all_passes, get_pass


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_and_json_recipes(tmp_path):
    yaml_recipe = load_recipe(_write(tmp_path, "passes:\n  - cleanup\n  - cleanup: {identity: false}\nseed: 7\ngate:\n  min_cosine: 0.99\n"))
    assert [s.name for s in yaml_recipe.steps] == ["cleanup", "cleanup"]
    assert yaml_recipe.steps[1].config == CleanupConfig(identity=False)
    assert yaml_recipe.seed == 7 and yaml_recipe.gate.min_cosine == 0.99
    json_recipe = load_recipe(_write(tmp_path, '{"passes": [{"cleanup": null}]}', "r.json"))
    assert json_recipe.steps[0].config == CleanupConfig()


def test_shipped_recipe_by_name():
    assert "cleanup" in shipped_recipes()
    recipe = load_recipe("cleanup")
    assert recipe.steps[0].name == "cleanup"
    for name in shipped_recipes():  # every shipped recipe is valid
        load_recipe(name)


@pytest.mark.parametrize(
    "text, message",
    [
        ("passes:\n  - cleanup\n  - cleanup: {fold_limit: -3}\n", "recipe.yaml: passes[1].cleanup.fold_limit: must be >= 0 (got -3)"),
        ("passes:\n  - cleanup: {identty: true}\n", "recipe.yaml: passes[0].cleanup.identty: unknown option"),
        ("passes:\n  - cleanup: {identity: maybe}\n", "recipe.yaml: passes[0].cleanup.identity: "),
        ("passes:\n  - claenup\n", "recipe.yaml: passes[0]: unknown pass 'claenup'; did you mean cleanup"),
        ("passes: []\n", "recipe.yaml: passes: must not be empty"),
        ("passes: [cleanup]\ngate: {min_cosine: 2}\n", "recipe.yaml: gate.min_cosine: must be <= 1 (got 2)"),
        ("passes: [cleanup]\ngaet: {}\n", "recipe.yaml: gaet: unknown option"),
        ("- cleanup\n", "recipe.yaml: a recipe must be a mapping"),
        ("passes: [cleanup\n", "recipe.yaml: not valid YAML"),
        ("passes:\n  - {cleanup: {}, other: {}}\n", "recipe.yaml: passes[0]: expected a pass name"),
    ],
)
def test_recipe_errors_name_the_place(tmp_path, text, message):
    with pytest.raises(OnnxcompError) as info:
        load_recipe(_write(tmp_path, text))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_is_loaded_safely(tmp_path):
    path = _write(tmp_path, "passes: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(OnnxcompError, match="not valid YAML"):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(OnnxcompError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(OnnxcompError, match="shipped"):
        load_recipe("no_such_recipe_name")


def test_registry_lists_passes_with_configs():
    passes = all_passes()
    assert "cleanup" in passes
    for name, cls in passes.items():
        assert cls.name == name and cls.summary and cls.Config.model_config["extra"] == "forbid"
    with pytest.raises(OnnxcompError, match="unknown pass"):
        get_pass("nope")


def test_parse_recipe_dict():
    recipe = parse_recipe({"passes": ["cleanup"]}, "<dict>")
    assert recipe.source == "<dict>" and recipe.seed == 0
