"""granularity: module and layer choose blocks and whole layers by mean NER."""

import json
import re
from collections import defaultdict

import pytest

from ner_merge.plan.planner import plan
from ner_merge.plan.selection import unit_decisions
from ner_merge.plan.source_map import Follows, SourceMap
from ner_merge.recipe.recipe import Recipe
from tests.helpers import (
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
    units = unit_decisions(SourceMap.load(out / "ner_source_map.json"))
    for unit, winner in expected_units(trio, 1).items():
        assert units[unit].source == names[winner], unit
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
            assert choice.follows == Follows(kind="layer"), name
        elif choice.shape and len(choice.shape) == 2:  # outside layers: alone
            assert choice.rule == "highest-ner", name


# --- hand edits: weights, map and report agree -------------------------------------


def _edited_merge(tmp_path, trio, granularity: str, edit) -> tuple[dict, str]:
    """Plan at `granularity`, edit the map's document, merge with it; the
    published map (checked bit for bit against the weights) and the report."""
    models = [trio["base"], trio["one"], trio["two"]]
    recipe = write_recipe(
        tmp_path / "r.yml", models[0], models[1:], granularity=granularity
    )
    document = json.loads(plan(Recipe.from_file(recipe), quiet=True).to_json())
    edit(document, [str(m) for m in models])
    (tmp_path / "edited.json").write_text(json.dumps(document))
    merge = write_recipe(
        tmp_path / "m.yml",
        models[0],
        models[1:],
        source_map=str(tmp_path / "edited.json"),
    )
    run_merge(merge, tmp_path / "out")
    source_map = assert_bit_identical_to_sources(tmp_path / "out")  # the weights
    return source_map, (tmp_path / "out" / "ner_report.md").read_text()


def _layer_row(report: str, layer: int) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {layer} |"))


def test_a_layer_moved_by_hand_moves_whole(tmp_path, trios):
    """granularity: layer promises whole layers: moving a layer's matrices by hand
    moves its norms too, and the report's row says one source."""
    trio = trios("llama")
    moved = {}

    def edit(document, names):
        matrices = [
            n for n, c in document["tensors"].items() if c["layer"] == 1 and c["scores"]
        ]
        source = document["tensors"][matrices[0]]["source"]
        moved["to"] = next(n for n in names if n != source)
        for name in matrices:
            document["tensors"][name]["source"] = moved["to"]

    source_map, report = _edited_merge(tmp_path, trio, "layer", edit)
    layer = [c for c in source_map["tensors"].values() if c["layer"] == 1]
    assert {c["source"] for c in layer} == {moved["to"]}  # norms included
    assert {c["rule"] for c in layer if c["scores"]} == {"override"}
    assert {c["follows"]["kind"] for c in layer if not c["scores"]} == {"unit"}
    label = f"M{[m['name'] for m in source_map['models']].index(moved['to'])}"
    row = _layer_row(report, 1)
    assert re.findall(r"M\d \(\d+\)", row.split("|")[2]) == [f"{label} ({len(layer)})"]
    assert f"`model.layers.1` -> {label}" in row


def test_one_block_matrix_edited_is_an_override_and_the_split_shows(tmp_path, trios):
    trio = trios("qwen2")  # q/k/v biases follow their matrix
    name = "model.layers.0.self_attn.k_proj.weight"
    moved = {}

    def edit(document, names):
        source = document["tensors"][name]["source"]
        moved["to"] = next(n for n in names if n != source)
        moved["from"] = source
        document["tensors"][name]["source"] = moved["to"]

    source_map, report = _edited_merge(tmp_path, trio, "module", edit)
    tensors = source_map["tensors"]
    assert (
        tensors[name]["rule"] == "override" and tensors[name]["source"] == moved["to"]
    )
    assert tensors[name]["unit"] == "model.layers.0.self_attn"
    assert tensors[name.replace(".weight", ".bias")]["source"] == moved["to"]
    others = [
        n
        for n, c in tensors.items()
        if c.get("unit") == "model.layers.0.self_attn" and n != name
    ]
    assert others and all(tensors[n]["source"] == moved["from"] for n in others)
    names = [m["name"] for m in source_map["models"]]
    row = _layer_row(report, 0)
    assert f"M{names.index(moved['to'])} (" in row.split("|")[2]  # the split shows
    assert f"M{names.index(moved['from'])} (" in row.split("|")[2]
    assert "`model.layers.0.self_attn` -> " in row
