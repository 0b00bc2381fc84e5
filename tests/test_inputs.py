"""Fail early and clean, accept what mergekit accepts: one model twice, local
folders offline, mergekit's in-memory API, the scoring device, an unusable cache
folder, and a source map reused under other names."""

import json
import logging
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from mergekit.merge_methods.api import merge_state_dicts, merge_tensors
from mergekit.options import MergeOptions

from ner_merge.errors import ModelError, NerMergeError, RecipeError, SourceMapError
from ner_merge.models.cache_folder import CACHE_DIR_VARIABLE
from ner_merge.models.content import ModelContent
from ner_merge.models.inventory import same_content
from ner_merge.models.resolve import ResolvedModel
from ner_merge.plan.planner import plan
from ner_merge.plan.selection import unit_decisions
from ner_merge.plan.source_map import SOURCE_MAP_FILE, SourceMap
from ner_merge.recipe.recipe import Recipe
from ner_merge.report.card import write_model_card
from ner_merge.scoring.streamed import check_device
from tests.helpers import (
    assert_bit_identical_to_sources,
    reference_ner,
    run_merge,
    write_recipe,
)


def _scored_nothing(cache: Path) -> bool:
    """No score (nor content index entry) was written: refused before scoring."""
    return not list(cache.rglob("*.json"))


def _recipe_text(base: str, models: list[str], **parameters) -> str:
    document = {
        "merge_method": "ner",
        "base_model": base,
        "models": [{"model": model} for model in models],
        "dtype": "bfloat16",
    }
    if parameters:
        document["parameters"] = parameters
    return yaml.safe_dump(document, sort_keys=False)


# --- one model twice ----------------------------------------------------------------


def test_a_fine_tune_listed_twice_is_refused_naming_both_entries(
    tmp_path, qwen_trio, isolated_score_cache
):
    one = qwen_trio["one"]
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [one, one])
    says = f"models.1.model: {one} is listed twice (also models.0.model); "
    with pytest.raises(RecipeError) as error:
        Recipe.from_file(recipe)
    assert str(error.value) == f"{recipe}: {says}list each model once"
    with pytest.raises(RecipeError, match="is listed twice"):
        run_merge(recipe, tmp_path / "out")  # mergekit's own refusal comes later
    assert _scored_nothing(isolated_score_cache)


def test_the_base_listed_again_among_the_models_is_one_candidate(tmp_path, qwen_trio):
    """mergekit takes it (recipes of weighted methods do it), and so do we."""
    base = qwen_trio["base"]
    again = write_recipe(tmp_path / "r.yml", base, [base, qwen_trio["one"]])
    once = write_recipe(tmp_path / "s.yml", base, [qwen_trio["one"]])
    assert Recipe.from_file(again).candidates() == Recipe.from_file(once).candidates()


@pytest.mark.parametrize("spelling", ["dot-dot", "symlink", "base-again"])
def test_one_folder_under_two_spellings_is_refused_before_scoring(
    tmp_path, qwen_trio, isolated_score_cache, spelling
):
    one = qwen_trio["one"]
    if spelling == "dot-dot":
        first, second = one, one.parent / ".." / one.parent.name / one.name
    elif spelling == "symlink":
        first, second = one, tmp_path / "sea"
        second.symlink_to(one)
    else:
        first, second = qwen_trio["base"], tmp_path / "base-link"
        second.symlink_to(qwen_trio["base"])
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [first, second])
    for attempt in (
        lambda: plan(Recipe.from_file(recipe), quiet=True),
        lambda: run_merge(recipe, tmp_path / "out"),
    ):
        with pytest.raises(ModelError) as error:
            attempt()
        assert str(error.value).endswith(
            f": models {first} and {second} are one folder "
            f"({os.path.realpath(first)}); list each model once"
        )
        assert "\n" not in str(error.value)
    assert _scored_nothing(isolated_score_cache)
    assert not (tmp_path / "out").exists()


def test_a_copy_of_a_model_in_another_folder_is_refused_before_scoring(
    tmp_path, qwen_trio, isolated_score_cache
):
    copy = shutil.copytree(qwen_trio["one"], tmp_path / "copy")
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"], copy]
    )
    with pytest.raises(ModelError) as error:
        run_merge(recipe, tmp_path / "out")
    assert str(error.value).endswith(
        f": models {qwen_trio['one']} and {copy} hold the same weights "
        "(every tensor identical); list each model once"
    )
    assert _scored_nothing(isolated_score_cache)


def test_telling_distinct_models_apart_reads_one_small_tensor_each(
    qwen_trio, monkeypatch
):
    reads = []
    original = ModelContent.read

    def counted(content, name):
        reads.append((content.name, name))
        return original(content, name)

    monkeypatch.setattr(ModelContent, "read", counted)
    models = [
        ResolvedModel(name=n, path=str(qwen_trio[n]), revision=None)
        for n in ("one", "two")
    ]
    assert not same_content(*models)
    assert len(reads) == 2 and reads[0][1] == reads[1][1]
    header = models[0].headers[reads[0][1]]
    assert len(header.shape) == 1  # a norm or a bias, not a matrix


# --- local folders offline: the model card asks no one ----------------------------


def _no_hub(*args, **kwargs):
    raise AssertionError(f"the Hub was asked: {args} {kwargs}")


def test_local_folders_with_one_slash_merge_offline(tmp_path, qwen_trio, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "repo_exists", _no_hub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _no_hub)
    (tmp_path / "models").mkdir()
    for name in ("base", "one"):
        (tmp_path / "models" / name).symlink_to(qwen_trio[name])
    recipe = tmp_path / "r.yml"
    recipe.write_text(_recipe_text("models/base", ["models/base", "models/one"]))
    monkeypatch.chdir(tmp_path)
    run_merge(recipe, tmp_path / "out")
    source_map = assert_bit_identical_to_sources(tmp_path / "out")
    assert [m["name"] for m in source_map["models"]] == ["models/base", "models/one"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "using models/base as a base" in card
    assert "* models/one" in card and "huggingface.co" not in card
    # Local models are named in the metadata too (mergekit leaves it empty).
    assert "---\nbase_model:\n- models/base\n- models/one\n" in card


def test_hub_ids_are_still_linked_in_the_card_without_asking_the_hub(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(huggingface_hub, "repo_exists", _no_hub)
    (tmp_path / "r.yml").write_text(_recipe_text("org/base", ["org/tuned@v1"]))
    monkeypatch.chdir(tmp_path)  # neither id is a folder here
    recipe = Recipe.from_file("r.yml")
    (tmp_path / "out").mkdir()
    write_model_card(tmp_path / "out", recipe.config, "merge_method: ner\n")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "[org/base](https://huggingface.co/org/base)" in card
    assert "* [org/tuned](https://huggingface.co/org/tuned)" in card
    assert "- org/base\n- org/tuned\n" in card  # the card's base_model metadata


# --- mergekit's in-memory API --------------------------------------------------------


def _matrices() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "gaussian": torch.randn(12, 8, generator=generator),
        "rank1": torch.randn(12, 1, generator=generator)
        @ torch.randn(1, 8, generator=generator),
        "orthogonal": torch.linalg.qr(torch.randn(12, 8, generator=generator))[0],
    }


def test_merge_tensors_returns_the_highest_ner_copy():
    copies = _matrices()
    tensors = list(copies.values())
    scores = [reference_ner(t) for t in tensors]
    for base_index in (None, 0, 1, 2):
        merged = merge_tensors(tensors, "ner", base_index=base_index, name="w")
        assert merged is tensors[scores.index(max(scores))]


def test_merge_tensors_ties_go_to_the_base_then_the_earlier_input():
    a, b = _matrices()["gaussian"], _matrices()["gaussian"]  # equal scores
    assert merge_tensors([a, b], "ner") is a
    assert merge_tensors([a, b], "ner", base_index=1) is b


def test_merge_state_dicts_scores_matrices_and_keeps_the_base_for_the_rest():
    copies = _matrices()
    vector = torch.randn(8)
    models = {
        "base": {"w": copies["rank1"], "bias": vector, "steps": torch.arange(3)},
        "tuned": {"w": copies["orthogonal"], "bias": -vector, "steps": torch.arange(3)},
    }
    merged = merge_state_dicts(models, "ner", base="base")
    assert merged["w"] is copies["orthogonal"]
    assert merged["bias"] is vector  # not scored: the base's copy
    assert torch.equal(merged["steps"], torch.arange(3))
    by_order = merge_state_dicts([models["tuned"], models["base"]], "ner")
    assert by_order["bias"] is models["tuned"]["bias"]  # no base: the first input


def test_merge_tensors_names_a_copy_holding_nan():
    broken = _matrices()["gaussian"].clone()
    broken[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"tensor w: input 1 holds NaN or Inf"):
        merge_tensors([_matrices()["gaussian"], broken], "ner", base_index=0, name="w")


def test_merge_tensors_with_a_map_follows_it(tmp_path, qwen_trio):
    base = qwen_trio["base"]
    recipe = write_recipe(tmp_path / "r.yml", base, [qwen_trio["one"]])
    source_map = plan(Recipe.from_file(recipe), quiet=True)
    source_map.save(tmp_path / "map.json")
    name, choice = next(
        (n, c) for n, c in source_map.tensors.items() if c.source != str(base)
    )
    ids = [str(base), str(qwen_trio["one"])]
    tensors = [torch.zeros(2, 2), torch.ones(2, 2)]
    merged = merge_tensors(
        tensors,
        "ner",
        parameters={"source_map": str(tmp_path / "map.json")},
        ids=ids,
        base_index=0,
        name=name,
    )
    assert merged is tensors[ids.index(source_map.model(choice.source).path)]


# --- the scoring device ------------------------------------------------------------


def test_a_device_torch_cannot_score_on_is_refused_before_scoring(
    tmp_path, qwen_trio, isolated_score_cache
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    with pytest.raises(NerMergeError) as error:
        run_merge(recipe, tmp_path / "out", device="meta")
    message = str(error.value)
    assert message.startswith("--device meta: torch cannot score on this device (")
    assert "\n" not in message
    assert _scored_nothing(isolated_score_cache)
    plan(Recipe.from_file(recipe), quiet=True)  # a warm cache: still refused
    with pytest.raises(NerMergeError, match="--device meta"):
        run_merge(recipe, tmp_path / "out", device="meta")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_named_as_the_option():
    with pytest.raises(NerMergeError, match=r"^--cuda: torch cannot score"):
        check_device(MergeOptions(cuda=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_agree_with_the_cpu(tmp_path, qwen_trio, monkeypatch):
    recipe = Recipe.from_file(
        write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    )
    monkeypatch.setenv(CACHE_DIR_VARIABLE, "off")  # score on each device
    on_cpu = plan(recipe, MergeOptions(), quiet=True)
    on_gpu = plan(recipe, MergeOptions(cuda=True), quiet=True)
    for name, choice in on_cpu.tensors.items():
        assert on_gpu.tensors[name].source == choice.source, name
        gpu = on_gpu.tensors[name]
        for model, score in choice.scores.items():  # float32 rounds otherwise there
            allowed = choice.bounds.get(model, 0) + gpu.bounds.get(model, 0) + 1e-6
            assert abs(gpu.scores[model] - score) <= allowed


# --- an unusable cache folder -------------------------------------------------------


def test_an_unusable_cache_folder_is_one_warning_per_run(
    tmp_path, qwen_trio, monkeypatch, caplog
):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "afile" / "cache"))
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    with caplog.at_level(logging.WARNING, logger="ner_merge"):
        run_merge(recipe, tmp_path / "out")
        plan(Recipe.from_file(recipe), quiet=True)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("ner_")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"cache folder {tmp_path / 'afile' / 'cache'} ")
    assert CACHE_DIR_VARIABLE in warnings[0]
    assert_bit_identical_to_sources(tmp_path / "out")


# --- a source map reused under other names ------------------------------------------


@pytest.fixture(scope="module")
def planned_elsewhere(tmp_path_factory, qwen_trio):
    """A map planned from links to the trio, in another folder (by blocks, so
    that units name models too; stabilized, so that the merge checks shares)."""
    folder = tmp_path_factory.mktemp("elsewhere")
    links = {}
    for name in ("base", "one", "two"):
        links[name] = folder / f"link-{name}"
        links[name].symlink_to(qwen_trio[name])
    recipe = write_recipe(
        folder / "r.yml",
        links["base"],
        [links["one"], links["two"]],
        stabilize=True,
        granularity="module",
    )
    path = folder / "plan.json"
    plan(Recipe.from_file(recipe), quiet=True).save(path)
    return path


def test_a_map_made_under_other_names_is_paired_by_content(
    tmp_path, qwen_trio, planned_elsewhere
):
    base, one, two = qwen_trio["base"], qwen_trio["one"], qwen_trio["two"]
    recipe = write_recipe(
        tmp_path / "r.yml", base, [two, one], source_map=str(planned_elsewhere)
    )
    run_merge(recipe, tmp_path / "out")
    source_map = assert_bit_identical_to_sources(tmp_path / "out")
    names = [str(base), str(two), str(one)]
    assert [m["name"] for m in source_map["models"]] == names
    assert [m["path"] for m in source_map["models"]] == names
    planned = json.loads(planned_elsewhere.read_text())
    renamed = {
        f"{planned_elsewhere.parent}/link-{n}": str(qwen_trio[n]) for n in qwen_trio
    }
    for name, choice in planned["tensors"].items():
        merged = source_map["tensors"][name]
        assert merged["source"] == renamed[choice["source"]], name
        assert merged["scores"] == {renamed[m]: s for m, s in choice["scores"].items()}
    units = unit_decisions(SourceMap.load(planned_elsewhere))
    merged_units = unit_decisions(SourceMap.load(tmp_path / "out" / SOURCE_MAP_FILE))
    assert units and {u: renamed[c.source] for u, c in units.items()} == {
        u: c.source for u, c in merged_units.items()
    }
    assert (
        str(planned_elsewhere.parent)
        not in (tmp_path / "out" / "ner_report.md").read_text()
    )


def test_recipe_options_other_than_the_maps_are_refused_naming_each(
    tmp_path, qwen_trio, planned_elsewhere, isolated_score_cache
):
    """The map was planned by modules, stabilized: a recipe beside it that says
    otherwise would be silently ignored, so each such option is named."""
    base, one, two = qwen_trio["base"], qwen_trio["one"], qwen_trio["two"]
    recipe = write_recipe(
        tmp_path / "r.yml",
        base,
        [one, two],
        source_map=str(planned_elsewhere),
        granularity="layer",
        stabilize=False,
    )
    with pytest.raises(SourceMapError) as error:
        run_merge(recipe, tmp_path / "out")
    assert str(error.value) == (
        f"{planned_elsewhere}: the recipe sets options the map was not planned "
        "with (granularity: 'layer' in the recipe, 'module' in the map; "
        "stabilize: False in the recipe, True in the map): plan again with them, "
        "or remove them from the recipe"
    )
    assert not (tmp_path / "out").exists()
    assert not list(isolated_score_cache.rglob("kernel-*/**/*.json"))


def test_a_recipe_naming_another_scoring_route_merges_with_the_maps_choices(
    tmp_path, qwen_trio, planned_elsewhere
):
    """Every route makes float64's choices, so `scoring` is not held against the
    map (planned with the default, auto): the merge takes the map's sources."""
    base, one, two = qwen_trio["base"], qwen_trio["one"], qwen_trio["two"]
    recipe = write_recipe(
        tmp_path / "r.yml",
        base,
        [one, two],
        source_map=str(planned_elsewhere),
        scoring="fast",
    )
    run_merge(recipe, tmp_path / "out")
    given = json.loads(planned_elsewhere.read_text())["tensors"]
    merged = json.loads((tmp_path / "out" / SOURCE_MAP_FILE).read_text())["tensors"]
    names = {f"link-{n}": str(qwen_trio[n]) for n in ("base", "one", "two")}
    assert {t: merged[t]["source"] for t in merged} == {
        t: names[Path(c["source"]).name] for t, c in given.items()
    }


def test_a_map_whose_base_is_a_fine_tune_here_is_refused(
    tmp_path, qwen_trio, planned_elsewhere, isolated_score_cache
):
    one, base = qwen_trio["one"], qwen_trio["base"]
    recipe = write_recipe(
        tmp_path / "r.yml",
        one,
        [base, qwen_trio["two"]],
        source_map=str(planned_elsewhere),
    )
    with pytest.raises(SourceMapError) as error:
        run_merge(recipe, tmp_path / "out")
    assert str(error.value).startswith(
        f"{planned_elsewhere}: model {one} is base in the recipe, but the map has "
        f"its content ({planned_elsewhere.parent}/link-one) as fine-tuned"
    )
    assert not list(isolated_score_cache.rglob("kernel-*/**/*.json"))


def test_an_error_in_the_merge_names_the_users_map(
    tmp_path, qwen_trio, planned_elsewhere
):
    document = json.loads(planned_elsewhere.read_text())
    name, choice = next(
        (n, c) for n, c in document["tensors"].items() if c["stabilized"] is not None
    )
    choice["stabilized"] = 0.999 if choice["stabilized"] < 0.5 else 0.001
    given = tmp_path / "edited.json"
    given.write_text(json.dumps(document))
    recipe = write_recipe(
        tmp_path / "r.yml",
        qwen_trio["base"],
        [qwen_trio["one"], qwen_trio["two"]],
        source_map=str(given),
    )
    with pytest.raises(SourceMapError) as error:
        run_merge(recipe, tmp_path / "out")
    assert str(error.value).startswith(f"{given}: tensor {name}: stabilize takes ")
    assert not (tmp_path / "out").exists()
