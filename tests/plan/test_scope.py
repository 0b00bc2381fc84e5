"""Selection scope: keep_base pins tensors to the base; exclude bars a model."""

import yaml

from tests.helpers import (
    FLAT_TENSOR,
    assert_bit_identical_to_sources,
    run_merge,
    write_recipe,
)


def test_keep_base_and_exclude_through_mergekit(tmp_path, qwen_trio):
    recipe = write_recipe(
        tmp_path / "r.yml",
        qwen_trio["base"],
        [qwen_trio["one"], qwen_trio["two"]],
        keep_base="model.embed_tokens.*, lm_head.*, model.layers.0.self_attn.q_proj.*",
    )
    document = yaml.safe_load(recipe.read_text())
    # two holds the planted winner FLAT_TENSOR; bar it from layer 1's MLP.
    document["models"][1]["parameters"] = {"exclude": "model.layers.1.mlp.*"}
    recipe.write_text(yaml.safe_dump(document))
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out)
    base, _, two = (m["name"] for m in source_map["models"])
    tensors = source_map["tensors"]
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",  # goes with its weight
    ):
        assert tensors[name]["source"] == base, name
        assert tensors[name]["rule"] == "keep-base", name
    flat = tensors[FLAT_TENSOR]
    assert flat["source"] != two and flat["excluded"] == [two]
    assert flat["scores"][two] == max(flat["scores"].values())  # it would have won
    assert two in {choice["source"] for choice in tensors.values()}
