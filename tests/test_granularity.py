"""granularity: module and layer choose blocks and whole layers by mean NER."""

import re
from collections import defaultdict

import pytest

from ner_merge.planner import plan
from ner_merge.recipe import Recipe
from tests.conftest import (
    assert_bit_identical_to_sources,
    load_tensors,
    reference_ner,
    run_merge,
    write_recipe,
)

LAYER = re.compile(r"^(model\.layers\.\d+)\.([^.]+)\.")


def expected_units(trio, pattern_group: int) -> dict[str, int]:
    """Independently: unit name -> index of the model with the highest mean NER
    of the unit's 2-D tensors (first on ties). pattern_group 1: whole layers,
    2: the layer's child modules."""
    loaded = [load_tensors(trio[n]) for n in ("base", "one", "two")]
    members = defaultdict(list)
    for name, tensor in loaded[0].items():
        match = LAYER.match(name)
        if match and tensor.ndim == 2:
            unit = match.group(1) if pattern_group == 1 else ".".join(match.groups())
            members[unit].append(name)
    winners = {}
    for unit, names in members.items():
        means = [
            sum(reference_ner(tensors[n]) for n in names) / len(names)
            for tensors in loaded
        ]
        winners[unit] = means.index(max(means))
    return winners


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_layer_granularity_takes_whole_layers_and_the_report_shows_it(
    tmp_path, trios, family
):
    trio = trios(family)
    recipe = write_recipe(
        tmp_path / "r.yml",
        trio["base"],
        [trio["one"], trio["two"]],
        granularity="layer",
    )
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out)
    names = [m["name"] for m in source_map["models"]]
    by_layer = defaultdict(set)
    for choice in source_map["tensors"].values():
        if choice["layer"] is not None:
            by_layer[choice["layer"]].add(choice["source"])
    assert by_layer and all(len(sources) == 1 for sources in by_layer.values())
    for unit, winner in expected_units(trio, 1).items():
        assert source_map["units"][unit]["source"] == names[winner], unit
    report = (out / "ner_report.md").read_text()
    rows = [line for line in report.splitlines() if re.match(r"^\| \d+ \| M\d", line)]
    assert len(rows) == len(by_layer)
    for row in rows:  # one source label per layer, and the whole layer chose
        assert len(re.findall(r"M\d \(\d+\)", row.split("|")[2])) == 1, row
        assert "mean" in row


def test_module_granularity_chooses_blocks_and_norms_follow_the_layer(tmp_path, trios):
    trio = trios("gemma2")  # four norms directly under each layer
    recipe = write_recipe(
        tmp_path / "r.yml",
        trio["base"],
        [trio["one"], trio["two"]],
        granularity="module",
    )
    source_map = plan(Recipe.from_file(recipe), quiet=True)
    names = [model.name for model in source_map.models]
    blocks = expected_units(trio, 2)
    assert {unit.rsplit(".", 1)[1] for unit in blocks} == {"self_attn", "mlp"}
    for name, choice in source_map.tensors.items():
        match = LAYER.match(name)
        if match and ".".join(match.groups()) in blocks:
            unit = ".".join(match.groups())
            assert choice.source == names[blocks[unit]], name
            assert choice.unit == unit and choice.rule == "highest-mean-ner"
        elif match:  # a norm directly under the layer: the layer rule
            assert choice.follows == f"layer {choice.layer}", name
        elif choice.shape and len(choice.shape) == 2:  # outside layers: alone
            assert choice.rule == "highest-ner", name
