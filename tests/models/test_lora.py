"""LoRA fine-tunes (`model: BASE+ADAPTER`) against peft's own merge.

The adapters are real PEFT adapters made by peft on a pico model, with B not zero
(`init_lora_weights=False`), so each changes the tensors it targets. The truth is
peft's `merge_and_unload`, run here on the saved base and adapter without
mergekit or ner-merge.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import peft
import pytest
import torch
import transformers
from click.testing import CliRunner
from mergekit.options import MergeOptions

from ner_merge.cli import main
from ner_merge.errors import ModelError, SourceMapError
from ner_merge.host.pipeline import checked_source_map, streaming_options
from ner_merge.models.inventory import resolve_models
from ner_merge.models.lora import LORA_CACHE_FOLDER
from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from tests import pico
from tests.helpers import (
    BIT_VIEWS,
    RANK1_TENSOR,
    assert_bit_identical_to_sources,
    assert_scores_near_reference,
    load_tensors,
    reference_ner,
    run_merge,
)
from tests.models.test_hub import ORG, add_to_cache
from tests.test_merge import MERGEKIT_YAML

TARGETS = ["q_proj", "v_proj"]


def make_adapter(base: Path, folder: Path, seed: int, **config) -> Path:
    """A PEFT LoRA adapter for the model saved in `base`, with random A and B."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    settings = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    settings.update(config)
    peft.get_peft_model(model, peft.LoraConfig(**settings)).save_pretrained(folder)
    return folder


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's own merge of `adapter` into `base`, in the base's dtype."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16
    )
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {name: tensor.clone() for name, tensor in merged.state_dict().items()}


def same_bits(first: torch.Tensor, second: torch.Tensor) -> bool:
    bits = BIT_VIEWS.get(first.dtype, first.dtype)
    return first.dtype == second.dtype and torch.equal(
        first.view(bits), second.view(bits)
    )


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory) -> dict[str, Path]:
    """A base whose layer-0 q_proj is rank 1 (NER 0: any adapter that changes it
    wins it), an adapter on q_proj and v_proj, and a plain fine-tune."""
    root = tmp_path_factory.mktemp("lora")
    plain = pico.base_model("qwen2", seed=0)
    base = pico.fine_tune(plain, seed=3, plant={RANK1_TENSOR: "rank1"})
    folders = {"base": pico.save_model(base, root / "base")}
    folders["adapter"] = make_adapter(folders["base"], root / "adapter", seed=4)
    folders["one"] = pico.save_model(pico.fine_tune(base, seed=5), root / "one")
    return folders


def lora_recipe(path: Path, base: Path, adapter: Path, *others: Path) -> Path:
    lines = [f"merge_method: ner\nbase_model: {base}\nmodels:\n"]
    lines += [f"  - model: {base}+{adapter}\n"]
    lines += [f"  - model: {other}\n" for other in others]
    path.write_text("".join(lines) + "dtype: bfloat16\n")
    return path


def test_merge_takes_peft_merged_tensors_bit_for_bit(tmp_path, lora_models):
    base, adapter = lora_models["base"], lora_models["adapter"]
    recipe = lora_recipe(tmp_path / "r.yml", base, adapter)
    out = tmp_path / "out"
    run_merge(recipe, out)  # no lora_merge_cache given: one is chosen
    truth = peft_merged(base, adapter)
    source_map = json.loads((out / "ner_source_map.json").read_text())
    lora = source_map["models"][1]
    assert lora["name"] == f"{base}+{adapter}"
    assert lora["lora"]["base"] == {
        "name": str(base),
        "path": str(base),
        "revision": None,
    }
    assert lora["lora"]["adapter"]["path"] == str(adapter)
    output = load_tensors(out)
    taken = [n for n, c in source_map["tensors"].items() if c["source"] == lora["name"]]
    assert RANK1_TENSOR in taken  # the adapter made it full rank
    for name in taken:
        assert same_bits(output[name], truth[name]), name
    # the folder scored is the folder merged from, and it is peft's merge
    scored = load_tensors(Path(lora["path"]))
    assert set(scored) <= set(truth)
    for name, tensor in scored.items():
        assert same_bits(tensor, truth[name]), name
    report = (out / "ner_report.md").read_text()
    assert f"base `{base}`, adapter `{adapter}`" in report


def test_untouched_tensors_are_the_bases_bytes(
    tmp_path, lora_models, isolated_score_cache
):
    base, adapter = lora_models["base"], lora_models["adapter"]
    recipe = Recipe.from_file(lora_recipe(tmp_path / "r.yml", base, adapter))
    base_model, lora_model = resolve_models(recipe)
    # merged in the cache folder, which the merge is then given
    folder = isolated_score_cache / LORA_CACHE_FOLDER
    assert Path(lora_model.path).parent == folder
    options = streaming_options(MergeOptions(), [base_model, lora_model])
    assert options.lora_merge_cache == str(folder)
    truth, stored = peft_merged(base, adapter), load_tensors(base)
    changed = {name for name in stored if not same_bits(stored[name], truth[name])}
    assert changed and all(any(t in n for t in TARGETS) for n in changed)
    for name in stored:
        same = lora_model.content.digest(name) == base_model.content.digest(name)
        assert same == (name not in changed), name


def test_a_changed_adapter_is_merged_and_scored_anew(tmp_path, lora_models):
    base = lora_models["base"]
    adapter = make_adapter(base, tmp_path / "adapter", seed=4)
    recipe = Recipe.from_file(lora_recipe(tmp_path / "r.yml", base, adapter))
    first = plan(recipe, quiet=True)
    map_file = tmp_path / "first.json"
    first.save(map_file)
    shutil.rmtree(adapter)
    make_adapter(base, adapter, seed=9)  # same path, other bytes
    second = plan(recipe, quiet=True)
    old, new = first.models[1], second.models[1]
    assert new.lora.adapter_hash != old.lora.adapter_hash
    assert new.fingerprint != old.fingerprint and new.path != old.path
    truth = peft_merged(base, adapter)
    changed = [name for name in second.tensors if "q_proj.weight" in name]
    for name in changed:  # scored from the new merge, not the old or a cache
        choice = second.tensors[name]
        expected = reference_ner(truth[name])
        assert_scores_near_reference(choice, [expected], [new.name])
    stale = recipe.with_options("test", source_map=str(map_file))
    with pytest.raises(SourceMapError, match="has changed since the map was made"):
        checked_source_map(stale, resolve_models(stale), MergeOptions())


def test_user_lora_merge_cache_is_used_and_reused(tmp_path, lora_models):
    """`ner-merge plan --lora-merge-cache DIR` merges the adapter into DIR, and a
    merge with that folder reads the very merge the plan scored."""
    base, adapter = lora_models["base"], lora_models["adapter"]
    recipe = lora_recipe(tmp_path / "r.yml", base, adapter, lora_models["one"])
    mine, map_file = tmp_path / "mine", tmp_path / "map.json"
    arguments = [str(recipe), "-o", str(map_file), "--lora-merge-cache", str(mine)]
    done = CliRunner().invoke(main, ["plan", "--quiet", *arguments])
    assert done.exit_code == 0, done.output
    (merged,) = mine.iterdir()
    weights = merged / "model.safetensors"
    before = weights.stat().st_mtime_ns
    run_merge(recipe, tmp_path / "out", lora_merge_cache=str(mine))
    assert [merged] == list(mine.iterdir()) and weights.stat().st_mtime_ns == before
    source_map = assert_bit_identical_to_sources(tmp_path / "out")
    assert source_map["models"][1]["path"] == str(merged)
    assert source_map == json.loads(map_file.read_text())


def test_a_lora_fine_tune_may_be_the_base(tmp_path, lora_models):
    """The merged folder gets the base's tokenizer (mergekit saves none), so it
    can give the merge its tokenizer."""
    base, adapter = lora_models["base"], lora_models["adapter"]
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"merge_method: ner\nbase_model: {base}+{adapter}\n"
        f"models:\n  - model: {lora_models['one']}\ndtype: bfloat16\n"
    )
    run_merge(recipe, tmp_path / "out")
    source_map = assert_bit_identical_to_sources(tmp_path / "out")
    assert source_map["models"][0]["lora"]["adapter"]["path"] == str(adapter)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        base / "tokenizer.json"
    ).read_bytes()


def refusal(cache: Path, recipe_file: Path) -> str:
    """The error a plan of the recipe raises, checked to come before anything
    was merged or scored (the cache folder holds neither)."""
    with pytest.raises(ModelError) as caught:
        plan(Recipe.from_file(recipe_file), quiet=True)
    assert not (cache / LORA_CACHE_FOLDER).exists()
    assert not list(cache.glob("kernel-*"))
    return str(caught.value)


def test_a_missing_adapter_folder_is_refused(
    tmp_path, lora_models, isolated_score_cache
):
    missing = tmp_path / "no-such-adapter"
    recipe = lora_recipe(tmp_path / "r.yml", lora_models["base"], missing)
    message = refusal(isolated_score_cache, recipe)
    assert message == (
        f"model {lora_models['base']}+{missing}: adapter {missing}: no such folder "
        f"{missing}"
    )


def test_a_folder_without_an_adapter_is_refused(
    tmp_path, lora_models, isolated_score_cache
):
    one = lora_models["one"]  # a whole model, not an adapter
    recipe = lora_recipe(tmp_path / "r.yml", lora_models["base"], one)
    message = refusal(isolated_score_cache, recipe)
    assert message.endswith(f"{one} is not a PEFT adapter (no adapter_config.json)")
    assert "\n" not in message
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(lora_models["adapter"] / "adapter_config.json", weightless)
    recipe = lora_recipe(tmp_path / "r.yml", lora_models["base"], weightless)
    message = refusal(isolated_score_cache, recipe)
    assert message.endswith(
        f"{weightless} is not a PEFT adapter "
        "(no adapter_model.safetensors or adapter_model.bin)"
    )
    foreign = shutil.copytree(lora_models["adapter"], tmp_path / "foreign")
    (foreign / "adapter_config.json").write_text("{}")
    recipe = lora_recipe(tmp_path / "r.yml", lora_models["base"], foreign)
    message = refusal(isolated_score_cache, recipe)
    assert message.endswith(
        f"{foreign / 'adapter_config.json'} is not a PEFT adapter's (no peft_type)"
    )


def test_an_adapter_of_other_shapes_is_refused_naming_each_tensor(
    tmp_path, lora_models, isolated_score_cache
):
    """An adapter made for a model with a narrower MLP does not fit the base's
    up_proj: each such tensor is named, with both shapes."""
    narrow = pico.save_model(
        pico.base_model("qwen2", seed=0, intermediate_size=48), tmp_path / "narrow"
    )
    adapter = make_adapter(
        narrow, tmp_path / "adapter", seed=4, target_modules=["q_proj", "up_proj"]
    )
    base = lora_models["base"]
    message = refusal(
        isolated_score_cache, lora_recipe(tmp_path / "r.yml", base, adapter)
    )
    lines = message.splitlines()
    assert len(lines) == 2  # layers 0 and 1; q_proj fits
    for layer, line in enumerate(lines):
        prefix = f"base_model.model.model.layers.{layer}.mlp.up_proj"
        assert line == (
            f"model {base}+{adapter}: adapter {adapter} does not fit base {base}: "
            f"tensor model.layers.{layer}.mlp.up_proj.weight is [64, 32] in the "
            f"base, but the adapter's {prefix}.lora_B.weight [48, 4] x "
            f"{prefix}.lora_A.weight [4, 32] make [48, 32]"
        )


def test_hub_base_and_adapter_resolve_offline(tmp_path, lora_models):
    """`org/base+org/adapter@tag` from a Hub cache, offline, via mergekit-yaml."""
    cache = tmp_path / "hub"
    commits = {
        name: add_to_cache(cache, f"{ORG}/{name}", lora_models[name], ["main", "v1"])
        for name in ("base", "adapter")
    }
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"merge_method: ner\nbase_model: {ORG}/base\n"
        f"models:\n  - model: {ORG}/base+{ORG}/adapter@v1\ndtype: bfloat16\n"
    )
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    done = subprocess.run(
        [MERGEKIT_YAML, str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
    source_map = assert_bit_identical_to_sources(tmp_path / "out")
    lora = source_map["models"][1]["lora"]
    assert lora["base"]["revision"] == commits["base"]
    assert lora["adapter"]["revision"] == commits["adapter"]
    assert lora["adapter"]["path"].startswith(str(cache))
    truth = peft_merged(lora_models["base"], lora_models["adapter"])
    merged = load_tensors(Path(source_map["models"][1]["path"]))
    assert all(same_bits(tensor, truth[name]) for name, tensor in merged.items())
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"* [{ORG}/base](https://huggingface.co/{ORG}/base)+{ORG}/adapter@v1" in card


def test_an_adapter_that_changes_nothing_is_named(tmp_path, lora_models):
    """peft's default initialisation makes B zero: an untrained adapter merges
    into the base's very weights, and the refusal says which adapter did."""
    base = lora_models["base"]
    adapter = make_adapter(base, tmp_path / "adapter", seed=4, init_lora_weights=True)
    recipe = Recipe.from_file(lora_recipe(tmp_path / "r.yml", base, adapter))
    with pytest.raises(ModelError) as caught:
        resolve_models(recipe)
    assert str(caught.value).endswith(
        f"hold the same weights (every tensor identical); list each model once "
        f"(adapter {adapter} changes no tensor of {base})"
    )
