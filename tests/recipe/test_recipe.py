"""Recipes: the shipped ones validate offline; bad ones fail early and clearly."""

from pathlib import Path

import pytest
import torch
import yaml

from ner_merge.errors import ModelError, RecipeError
from ner_merge.models.folders import check_base_tokenizer
from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from tests import pico
from tests.helpers import run_merge, write_recipe

CONFIGS = Path(__file__).parents[2] / "configs"


def test_every_shipped_ner_recipe_is_tested():
    assert {path.name for path in CONFIGS.glob("*-ner.yml")} == {
        "qwen-ner.yml",
        "llama-ner.yml",
        "mistral-ner.yml",
        "tiny-ner.yml",
    }


@pytest.mark.parametrize(
    "name", ["qwen-ner.yml", "llama-ner.yml", "mistral-ner.yml", "tiny-ner.yml"]
)
def test_shipped_recipes_validate_offline(name):
    recipe = Recipe.from_file(CONFIGS / name)
    assert recipe.config.merge_method == "ner"
    assert len(recipe.candidates()) >= 3


@pytest.mark.parametrize(
    "name, base, family",
    [
        ("qwen-ner.yml", "Qwen/Qwen2.5-7B", "7B"),
        ("llama-ner.yml", "meta-llama/Llama-3.1-8B", "Llama-3.1"),
        ("mistral-ner.yml", "mistralai/Mistral-7B-v0.1", "7b"),
    ],
)
def test_hub_recipes_name_one_base_and_its_fine_tunes(name, base, family):
    recipe = Recipe.from_file(CONFIGS / name)
    names = [str(model) for model in recipe.candidates()]
    assert names[0] == base
    for model in names:  # Hub ids (org/name), all of the base's family
        assert model.count("/") == 1 and not model.startswith((".", "/"))
        assert family.lower() in model.lower(), model


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yml"
    path.write_text(text)
    return path


MINIMAL = "merge_method: ner\nbase_model: /a\nmodels:\n  - model: /b\n"


@pytest.mark.parametrize(
    "extra, field",
    [
        ("parameters:\n  sourcemap: x.json\n", "parameters.sourcemap"),
        ("parameters:\n  source_map: 3\n", "parameters.source_map"),
        ("parameters:\n  granularity: block\n", "parameters.granularity"),
        ("parameters:\n  keep_base: 'lm_head.*,,x'\n", "parameters.keep_base"),
        ("parameters:\n  keep_base: [lm_head.weight]\n", "parameters.keep_base"),
        ("parameters:\n  compat: nerdy\n", "parameters.compat"),
        ("parameters:\n  stabilize: 'yes'\n", "parameters.stabilize"),
        ("    parameters:\n      exlude: x\n", "models.0.parameters.exlude"),
        ("    parameters:\n      exclude: ','\n", "models.0.parameters.exclude"),
        ("    parameters:\n      exclude: 3\n", "models.0.parameters.exclude"),
    ],
)
def test_bad_options_name_the_option_and_the_file(tmp_path, extra, field):
    path = _recipe(tmp_path, MINIMAL + extra)
    with pytest.raises(RecipeError) as error:
        Recipe.from_file(path)
    assert field in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize(
    "text, says",
    [
        ("merge_method: ner\nbase_model: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
        (
            "merge_method: linear\nbase_model: /a\nmodels:\n  - model: /b\n",
            "merge_method",
        ),
        ("merge_method: ner\nmodels:\n  - model: /b\n  - model: /c\n", "base_model"),
        ("merge_method: ner\nbase_model: /a\nmodels:\n  - model: /a\n", "at least one"),
        ("merge_method: ner\nbase_model: /a\nmodels: 7\n", "models"),
        (
            MINIMAL + "  - model: /a\n    parameters:\n      exclude: x\n",
            "base cannot be excluded",
        ),
    ],
)
def test_malformed_recipes_are_rejected_with_the_file_named(tmp_path, text, says):
    path = _recipe(tmp_path, text)
    with pytest.raises(RecipeError, match=says) as error:
        Recipe.from_file(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("option", ["keep_base", "exclude"])
def test_a_pattern_that_matches_no_tensor_is_named(tmp_path, qwen_trio, option):
    path = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    text = path.read_text()
    if option == "keep_base":
        text += "parameters:\n  keep_base: lm_head.*,model.embed.weight\n"
    else:
        text = text.replace("/one\n", "/one\n  parameters:\n    exclude: mlp.*\n")
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        plan(Recipe.from_file(path), quiet=True)
    message = str(error.value)
    assert f"parameters.{option}" in message and str(path) in message
    assert ("'model.embed.weight'" if option == "keep_base" else "'mlp.*'") in message


def test_missing_model_path_is_named(tmp_path, qwen_trio):
    missing = tmp_path / "no-such-model"
    path = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [missing])
    with pytest.raises(ModelError, match=str(missing)):
        plan(Recipe.from_file(path), quiet=True)


def test_folder_without_weights_is_named(tmp_path, qwen_trio):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [empty])
    with pytest.raises(ModelError, match="no weights"):
        plan(Recipe.from_file(path), quiet=True)


def test_mismatched_shapes_name_tensor_and_shapes(tmp_path, qwen_trio):
    wider = pico.save_model(
        pico.base_model("qwen2", intermediate_size=48), tmp_path / "w"
    )
    path = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [wider])
    with pytest.raises(ModelError) as error:
        plan(Recipe.from_file(path), quiet=True)
    message = str(error.value)
    assert "model.layers.0.mlp.up_proj.weight" in message
    assert "[64, 32]" in message and "[48, 32]" in message


@pytest.mark.parametrize("field", ["dtype", "out_dtype"])
@pytest.mark.parametrize("name", ["bf16", "float", "int64"])
def test_a_dtype_mergekit_would_reject_or_no_float_is_named(tmp_path, field, name):
    path = _recipe(tmp_path, MINIMAL + f"{field}: {name}\n")
    with pytest.raises(RecipeError) as error:
        Recipe.from_file(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {field}: {name!r} is not a floating-point")
    assert "bfloat16, float16, float32, float64" in message


@pytest.mark.parametrize("name", ["bfloat16", "float16", "float32", "torch.bfloat16"])
def test_every_dtype_mergekit_takes_is_accepted(tmp_path, name):
    assert Recipe.from_file(_recipe(tmp_path, MINIMAL + f"dtype: {name}\n"))


@pytest.mark.parametrize(
    "text, field, hint",
    [
        (MINIMAL + "paramters:\n  granularity: layer\n", "paramters", "parameters"),
        (MINIMAL + "dtpye: bfloat16\n", "dtpye", "dtype"),
        (MINIMAL + "    paramters:\n      exclude: x\n", "models.0.paramters", None),
        (MINIMAL + "    weight: 0.5\n", "models.0.weight", None),
    ],
)
def test_keys_mergekit_would_silently_drop_are_named(tmp_path, text, field, hint):
    path = _recipe(tmp_path, text)
    with pytest.raises(RecipeError) as error:
        Recipe.from_file(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {field}: not a")
    assert "mergekit would ignore it" in message
    if hint:
        assert f"did you mean {hint}?" in message


def test_the_mergekit_yaml_path_sees_dropped_keys_in_the_source():
    """mergekit-yaml hands over a parsed configuration, which has lost the key;
    the recipe text it read (`config_source`) still has it."""
    from mergekit.config import MergeConfiguration

    text = MINIMAL + "paramters:\n  granularity: layer\n"
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert Recipe.from_config(config, "r.yml").options.granularity == "tensor"
    with pytest.raises(RecipeError, match="r.yml: paramters: not a recipe field"):
        Recipe.from_config(config, "r.yml", source=text)


def test_every_problem_is_listed_at_once_one_line_each(tmp_path):
    path = _recipe(
        tmp_path,
        "merge_method: ner\nbase_model: /a\ndtype: bf16\n"
        "parameters:\n  granularity: block\n  weight: 0.5\n"
        "models:\n  - model: /b\n  - model: /c\n"
        "    parameters:\n      exlude: x\n      density: 0.2\n",
    )
    with pytest.raises(RecipeError) as error:
        Recipe.from_file(path)
    lines = str(error.value).splitlines()
    fields = [line.removeprefix(f"{path}: ").split(":")[0] for line in lines]
    assert all(line.startswith(f"{path}: ") for line in lines)
    assert fields == [
        "dtype",
        "parameters.weight",
        "parameters.granularity",
        "models.1.parameters.density",
        "models.1.parameters.exlude",
    ]
    assert "did you mean exclude?" in lines[-1]
    for line in (lines[1], lines[3]):
        assert "ner copies each tensor whole" in line and "takes no weights" in line


def _without_tokenizer(folder: Path) -> Path:
    pico.base_model("qwen2").to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_a_base_without_tokenizer_files_is_refused_when_copied(tmp_path, qwen_trio):
    from mergekit.options import MergeOptions

    base = _without_tokenizer(tmp_path / "bare")
    recipe = Recipe.from_file(
        write_recipe(tmp_path / "r.yml", base, [qwen_trio["one"]])
    )
    with pytest.raises(ModelError) as error:
        check_base_tokenizer(recipe, base, MergeOptions(copy_tokenizer=True))
    message = str(error.value)
    assert message.startswith(f"{recipe.where}: base_model {base}: no usable tokenizer")
    assert "--no-copy-tokenizer" in message
    check_base_tokenizer(recipe, base, MergeOptions(copy_tokenizer=False))
    check_base_tokenizer(recipe, qwen_trio["base"], MergeOptions(copy_tokenizer=True))


def test_mergekit_yaml_refuses_a_misspelt_top_level_key(tmp_path, qwen_trio):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    text = recipe.read_text() + "paramters:\n  granularity: layer\n"
    recipe.write_text(text)
    with pytest.raises(RecipeError, match="paramters"):
        run_merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
