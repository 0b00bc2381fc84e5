"""Never silently wrong: a map's options and paths, its parsing, and NaN or Inf in
tensors no rule scores."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ner_merge.errors import ModelError, SourceMapError
from ner_merge.plan.planner import plan
from ner_merge.plan.source_map import SourceMap
from ner_merge.recipe.recipe import Recipe
from tests.helpers import (
    assert_bit_identical_to_sources,
    load_tensors,
    run_merge,
    write_recipe,
)

NORM = "model.layers.1.post_attention_layernorm.weight"
PROJECTION = "model.layers.0.self_attn.k_proj"


def _poisoned(source: Path, target: Path, name: str) -> Path:
    """A copy of a model with one value of one tensor set to NaN."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def planned(tmp_path_factory, qwen_trio):
    """A map planned at granularity module, and the models it was made for."""
    folder = tmp_path_factory.mktemp("planned")
    models = [qwen_trio["base"], qwen_trio["one"], qwen_trio["two"]]
    recipe = write_recipe(folder / "r.yml", models[0], models[1:], granularity="module")
    path = folder / "map.json"
    plan(Recipe.from_file(recipe), quiet=True).save(path)
    return path, models


def _merge(tmp_path, models, map_text: str, **options) -> Path:
    map_path = tmp_path / "given.json"
    map_path.write_text(map_text)
    recipe = write_recipe(
        tmp_path / "m.yml", models[0], models[1:], source_map=str(map_path), **options
    )
    run_merge(recipe, tmp_path / "out")
    return tmp_path / "out"


# --- recipe options beside a map -------------------------------------------------


def test_recipe_options_that_differ_from_the_map_are_all_named(tmp_path, planned):
    path, models = planned
    options = dict(granularity="layer", keep_base="lm_head.*", stabilize=True)
    with pytest.raises(SourceMapError) as error:
        _merge(tmp_path, models, path.read_text(), **options)
    message = str(error.value)
    assert str(tmp_path / "given.json") in message
    for key in options:
        assert f"{key}: " in message
    assert not (tmp_path / "out").exists()


def test_a_differing_exclude_is_named(tmp_path, planned):
    path, models = planned
    map_path = tmp_path / "given.json"
    map_path.write_text(path.read_text())
    recipe = write_recipe(
        tmp_path / "m.yml", models[0], models[1:], source_map=str(map_path)
    )
    document = (
        Path(recipe)
        .read_text()
        .replace(
            f"- model: {models[2]}\n",
            f"- model: {models[2]}\n  parameters:\n    exclude: '*'\n",
        )
    )
    Path(recipe).write_text(document)
    with pytest.raises(SourceMapError, match=f"exclude of model {models[2]}"):
        run_merge(recipe, tmp_path / "out")


def test_options_the_recipe_repeats_or_leaves_out_are_the_maps(tmp_path, planned):
    path, models = planned
    out = _merge(tmp_path, models, path.read_text(), granularity="module")
    source_map = assert_bit_identical_to_sources(out)
    assert source_map["options"]["granularity"] == "module"


# --- the map's paths ---------------------------------------------------------------


def test_a_map_path_pointing_elsewhere_is_not_read(tmp_path, planned):
    """The map names models; their files come from the recipe."""
    path, models = planned
    document = json.loads(path.read_text())
    document["models"][2]["path"] = str(models[1])  # "two" now points at "one"
    out = _merge(tmp_path, models, json.dumps(document))
    source_map = assert_bit_identical_to_sources(out)  # reads the published paths
    assert [m["path"] for m in source_map["models"]] == [str(m) for m in models]
    merged, two = load_tensors(out), load_tensors(models[2])
    chosen = source_map["tensors"].items()
    taken = [n for n, c in chosen if c["source"] == str(models[2])]
    assert taken and all(torch.equal(merged[n], two[n]) for n in taken)


# --- strict parsing --------------------------------------------------------------

MATRIX = "model.layers.1.self_attn.o_proj.weight"


def _edit_text(text: str, edit) -> str:
    document = json.loads(text)
    edit(document)
    return json.dumps(document, indent=1)


def _set_score(value):
    def edit(document):
        first = document["models"][1]["name"]
        document["tensors"][MATRIX]["scores"][first] = value

    return edit


def _set_bound(value, unscored: bool = False):
    def edit(document):
        name = document["models"][1]["name"]
        document["tensors"][MATRIX]["bounds"] = {name: value}
        if unscored:
            del document["tensors"][MATRIX]["scores"][name]

    return edit


@pytest.mark.parametrize(
    "make, says",
    [
        (
            lambda t: t.replace('"tensors": {', f'"tensors": {{"{MATRIX}": {{}},', 1),
            f"given twice in one object: \\['{MATRIX}'\\]",
        ),
        (lambda t: _edit_text(t, _set_score("0.5")), f"tensors.{MATRIX}.scores"),
        (lambda t: _edit_text(t, _set_score(True)), f"tensors.{MATRIX}.scores"),
        (
            lambda t: _edit_text(t, _set_score(0.5)).replace(": 0.5", ": NaN", 1),
            "NaN is not a number JSON allows",
        ),
        (lambda t: _edit_text(t, _set_bound("1e-6")), f"tensors.{MATRIX}.bounds"),
        (lambda t: _edit_text(t, _set_bound(-1e-6)), "each bound must be a number"),
        (
            lambda t: _edit_text(t, _set_bound(1e-6, unscored=True)),
            "has bounds for models it has no score of",
        ),
    ],
    ids=[
        "duplicate-key",
        "string-score",
        "bool-score",
        "nan-literal",
        "string-bound",
        "negative-bound",
        "bound-without-score",
    ],
)
def test_loose_maps_are_refused_by_name(tmp_path, planned, make, says):
    path, models = planned
    text = make(path.read_text())
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(SourceMapError, match=says) as error:
        SourceMap.load(tmp_path / "bad.json")
    assert str(tmp_path / "bad.json") in str(error.value)
    with pytest.raises(SourceMapError, match=says):
        _merge(tmp_path, models, text)
    assert not (tmp_path / "out").exists()


def test_a_map_never_holds_nan(tmp_path, planned):
    path, _ = planned
    source_map = SourceMap.load(path)
    name, choice = next((n, c) for n, c in source_map.tensors.items() if c.scores)
    scores = dict.fromkeys(choice.scores, float("nan"))
    broken = source_map.tensors | {name: choice.model_copy(update={"scores": scores})}
    with pytest.raises(ValueError):
        source_map.model_copy(update={"tensors": broken}).to_json()


# --- NaN or Inf where no rule scores -----------------------------------------------


def test_nan_in_a_norm_stops_the_plan_before_scoring(
    tmp_path, qwen_trio, isolated_score_cache
):
    bad = _poisoned(qwen_trio["one"], tmp_path / "bad", NORM)
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [bad])
    with pytest.raises(ModelError) as error:
        plan(Recipe.from_file(recipe), quiet=True)
    message = str(error.value)
    assert f"model {bad}: tensor {NORM} holds NaN or Inf" in message
    assert "nonfinite: lose" in message
    assert not list(isolated_score_cache.rglob("*.json"))  # nothing was scored


def test_nan_in_a_norm_or_bias_is_never_copied(tmp_path, qwen_trio):
    """With `nonfinite: lose`, a copy holding NaN may not supply its tensor, nor
    the matrix a poisoned bias goes with."""
    bad = _poisoned(qwen_trio["one"], tmp_path / "one", NORM)
    bad = _poisoned(bad, tmp_path / "bad", f"{PROJECTION}.bias")
    # Make the poisoned model win that layer's norm and that projection if it could.
    recipe = write_recipe(
        tmp_path / "r.yml", bad, [qwen_trio["base"]], nonfinite="lose"
    )
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out)
    for name in (NORM, f"{PROJECTION}.bias", f"{PROJECTION}.weight"):
        choice = source_map["tensors"][name]
        assert choice["source"] == str(qwen_trio["base"]), name
        assert str(bad) in choice["excluded"], name
    assert all(torch.isfinite(t).all() for t in load_tensors(out).values())


def test_a_map_that_takes_a_nan_copy_is_refused(tmp_path, qwen_trio):
    bad = _poisoned(qwen_trio["one"], tmp_path / "bad", NORM)
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], [bad], nonfinite="lose"
    )
    document = json.loads(plan(Recipe.from_file(recipe), quiet=True).to_json())
    document["tensors"][NORM]["source"] = str(bad)
    document["tensors"][NORM]["rule"] = "override"
    with pytest.raises(SourceMapError, match=f"{NORM} from {bad}"):
        _merge(tmp_path, [qwen_trio["base"], bad], json.dumps(document))
    assert not (tmp_path / "out").exists()
