"""End to end: plans agree with brute force, merges are bit-identical to plans."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file

from ner_merge.plan.planner import plan
from ner_merge.plan.selection import first_best
from ner_merge.plan.source_map import Follows
from ner_merge.recipe.recipe import Recipe
from tests.helpers import (
    FLAT_TENSOR,
    RANK1_TENSOR,
    assert_bit_identical_to_sources,
    assert_scores_near_reference,
    brute_force_winners,
    load_tensors,
    reference_ner,
    run_merge,
    twin,
    write_recipe,
)

MERGEKIT_YAML = str(Path(sys.executable).parent / "mergekit-yaml")


def test_stock_mergekit_yaml_merges_bit_identically(tmp_path, qwen_trio):
    recipe = write_recipe(
        tmp_path / "recipe.yml", qwen_trio["base"], [qwen_trio["one"], qwen_trio["two"]]
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [MERGEKIT_YAML, str(recipe), str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for name in (
        "config.json",
        "tokenizer.json",
        "README.md",
        "ner_report.md",
        "ner_report.png",
    ):
        assert (out / name).is_file(), name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    source_map = assert_bit_identical_to_sources(out)

    # Every matrix from its highest-NER model, by an independent computation.
    models = [qwen_trio["base"], qwen_trio["one"], qwen_trio["two"]]
    names = [m["name"] for m in source_map["models"]]
    for tensor, winner in brute_force_winners(models).items():
        assert source_map["tensors"][tensor]["source"] == names[winner], tensor
    assert source_map["tensors"][RANK1_TENSOR]["source"] != names[1]
    assert source_map["tensors"][FLAT_TENSOR]["source"] == names[2]
    assert "NER layer selection" in (out / "README.md").read_text()

    # The result is an ordinary Hugging Face model that loads and generates.
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The boat", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_scores_match_the_reference_and_biases_follow_their_matrix(tmp_path, qwen_trio):
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"], qwen_trio["two"]]
    )
    source_map = plan(Recipe.from_file(recipe), quiet=True)
    tensors = [load_tensors(qwen_trio[n]) for n in ("base", "one", "two")]
    for name, choice in source_map.tensors.items():
        if choice.rule == "highest-ner":
            expected = [reference_ner(t[name]) for t in tensors]
            assert_scores_near_reference(choice, expected, list(choice.scores))
        elif name.endswith(".bias"):
            matrix = name.removesuffix(".bias") + ".weight"
            assert choice.follows == Follows(kind="tensor", name=matrix)
            assert choice.source == source_map.tensors[matrix].source
    norm = source_map.tensors["model.layers.0.input_layernorm.weight"]
    assert norm.rule == "follows" and norm.follows == Follows(kind="layer")


def test_ties_go_to_the_base_then_the_earlier_model(tmp_path, qwen_trio):
    assert first_best([0.5, 0.7, 0.7]) == 1 and first_best([0.2, 0.2]) == 0
    copy_of_base = twin(qwen_trio["base"], tmp_path / "copy_of_base")
    copy_of_one = twin(qwen_trio["one"], tmp_path / "copy_of_one")
    recipe = write_recipe(
        tmp_path / "r.yml",
        qwen_trio["base"],
        [copy_of_base, qwen_trio["one"], copy_of_one],
    )
    source_map = plan(Recipe.from_file(recipe), quiet=True)
    sources = {choice.source for choice in source_map.tensors.values()}
    assert sources <= {str(qwen_trio["base"]), str(qwen_trio["one"])}
    assert str(qwen_trio["one"]) in sources  # the fine-tune does win somewhere


def test_cli_reports_bad_options_without_a_traceback(tmp_path, qwen_trio):
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]], sourcemap="x"
    )
    done = subprocess.run(
        [MERGEKIT_YAML, str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0
    assert "parameters.sourcemap" in done.stderr and str(recipe) in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_ner_merge_plan_cli_writes_a_map_and_nothing_else(tmp_path, qwen_trio):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    map_path = tmp_path / "map.json"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "ner-merge"),
            "plan",
            str(recipe),
            "-o",
            str(map_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert map_path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json", "r.yml"]


def test_planned_dtype_other_than_stored_is_still_copied_exactly(tmp_path, qwen_trio):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["two"]])
    recipe.write_text(recipe.read_text().replace("bfloat16", "float32"))
    run_merge(recipe, tmp_path / "out")
    assert_bit_identical_to_sources(tmp_path / "out", dtype=torch.float32)


def test_default_shards_hold_about_one_largest_tensor(tmp_path, qwen_trio, monkeypatch):
    # mergekit's writer keeps a whole shard in memory (5 GB by default); an NER
    # merge sizes shards by the largest tensor unless the user chose a size.
    monkeypatch.setattr("ner_merge.host.pipeline.SMALLEST_DEFAULT_SHARD", 0)
    recipe = write_recipe(
        tmp_path / "recipe.yml", qwen_trio["base"], [qwen_trio["one"], qwen_trio["two"]]
    )
    run_merge(recipe, tmp_path / "small")
    run_merge(recipe, tmp_path / "chosen", out_shard_size=10**12)
    assert len(list((tmp_path / "chosen").glob("*.safetensors"))) == 1
    shards = [load_file(p) for p in (tmp_path / "small").glob("*.safetensors")]
    largest = max(t.nbytes for shard in shards for t in shard.values())
    assert len(shards) > 2
    for shard in shards:
        assert len(shard) == 1 or sum(t.nbytes for t in shard.values()) <= largest
    assert_bit_identical_to_sources(tmp_path / "small")
