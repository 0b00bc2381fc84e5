"""What a user sees of a merge: figure, report, model card, `plan --show`, `show`.

Tests named `..._is_consistent_with_...` compare one view of a source map with
another part of this tool (the grid, the palette, `share_by_model`, `margin`):
they catch views that disagree, not a wrong map or a wrong palette shared by both.
"""

import logging
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from ner_merge.cli import main
from ner_merge.models.names import tensor_type
from ner_merge.plan.source_map import SourceMap, TensorChoice
from ner_merge.recipe.recipe import Recipe
from ner_merge.report import markdown as report
from ner_merge.report.card import CARD_FILE
from ner_merge.report.figure import (
    EMPTY_COLOUR,
    draw_figure,
    model_colour,
    write_figure,
)
from ner_merge.report.grid import margin, short_labels, source_grid
from tests.helpers import run_merge, write_recipe


@pytest.fixture(scope="module")
def merged(tmp_path_factory, qwen_trio) -> Path:
    """One NER merge of the pico trio, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("merged")
    recipe = write_recipe(
        root / "r.yml", qwen_trio["base"], [qwen_trio["one"], qwen_trio["two"]]
    )
    run_merge(recipe, root / "out")
    return root / "out"


def test_heat_map_matrix_is_consistent_with_the_source_map(merged):
    source_map = SourceMap.load(merged / "ner_source_map.json")
    grid = source_grid(source_map)
    matrix = grid.source_indices()
    names = [model.name for model in source_map.models]
    placed = 0
    for name, choice in source_map.tensors.items():
        row = grid.rows.index(choice.layer)
        column = grid.columns.index(tensor_type(name, choice.layer))
        assert matrix[row][column] == names.index(choice.source), name
        placed += 1
    filled = sum(index is not None for line in matrix for index in line)
    assert filled == placed == len(source_map.tensors)  # one cell per tensor
    assert grid.rows == (0, 1, None)
    assert matrix[grid.rows.index(1)][grid.columns.index("mlp.up_proj.weight")] == 2


def test_figure_pixels_are_consistent_with_the_grid_and_palette(merged):
    png = merged / report.FIGURE_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(png)  # (height, width, RGBA) floats in [0, 1]
    source_map = SourceMap.load(merged / "ner_source_map.json")
    grid = source_grid(source_map)
    figure = draw_figure(source_map)
    figure.canvas.draw()  # lays the figure out exactly as savefig did
    heat_map = figure.axes[0]
    assert pixels.shape[:2] == (figure.canvas.get_width_height()[::-1])
    for r, line in enumerate(grid.source_indices()):
        for c, index in enumerate(line):
            x, y = heat_map.transData.transform((c, r))
            pixel = pixels[pixels.shape[0] - int(round(y)), int(round(x)), :3]
            colour = EMPTY_COLOUR if index is None else model_colour(index)
            assert pixel == pytest.approx(to_rgb(colour), abs=0.02), (r, c)


def test_card_shares_are_consistent_with_the_map_and_the_report_has_the_figure(merged):
    assert f"]({report.FIGURE_FILE})" in (merged / report.REPORT_FILE).read_text()
    source_map = SourceMap.load(merged / "ner_source_map.json")
    card = (merged / CARD_FILE).read_text()
    section = card[card.index("## NER layer selection") :]
    rows = re.findall(r"^\| `(.+?)` \| (\S+) \| (\d+) \| ([\d.]+)% \|$", section, re.M)
    total = len(source_map.tensors)
    shares = source_map.share_by_model()
    assert [name for name, *_ in rows] == list(shares)
    for name, role, count, percent in rows:
        assert role == source_map.model(name).role
        assert int(count) == shares[name]
        assert float(percent) == pytest.approx(100 * shares[name] / total, abs=0.05)
    assert sum(int(count) for _, _, count, _ in rows) == total
    assert f"[{report.REPORT_FILE}]({report.REPORT_FILE})" in section
    assert f"[{report.FIGURE_FILE}]({report.FIGURE_FILE})" in section


def test_each_model_has_a_colour_of_its_own():
    """Independent of the palette's choices: models stay apart, and from gaps."""
    colours = [to_rgb(model_colour(index)) for index in range(8)]
    assert len(set(colours)) == len(colours)
    assert to_rgb(EMPTY_COLOUR) not in colours


def test_figure_bytes_are_reproducible(tmp_path, merged):
    source_map = SourceMap.load(merged / "ner_source_map.json")
    write_figure(source_map, tmp_path / "again.png")
    assert (tmp_path / "again.png").read_bytes() == (
        merged / report.FIGURE_FILE
    ).read_bytes()


def test_without_matplotlib_the_figure_is_skipped_in_one_line(
    tmp_path, merged, monkeypatch, caplog
):
    for name in [n for n in sys.modules if n.split(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails
    monkeypatch.delitem(sys.modules, "ner_merge.report.figure")
    source_map = SourceMap.load(merged / "ner_source_map.json")
    recipe = Recipe.from_file(merged.parent / "r.yml")
    with caplog.at_level(logging.WARNING, logger="ner_merge"):
        report.write_report(tmp_path, source_map, recipe)
    assert not (tmp_path / report.FIGURE_FILE).exists()
    assert report.FIGURE_FILE not in (tmp_path / report.REPORT_FILE).read_text()
    [record] = caplog.records
    assert record.getMessage().startswith(f"skipping {report.FIGURE_FILE}: ")
    assert "pip install 'ner-merge[report]'" in record.getMessage()


def _files(*folders: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime for f in folders for p in f.rglob("*")}


def _cell(table: str, layer: int, column: str) -> list[str]:
    """A layer's cell in `plan_table` output: [source label, margin]."""
    lines = table.splitlines()
    header = next(line.split() for line in lines if line.startswith("layer "))
    words = next(line.split() for line in lines if line.startswith(f"{layer} "))
    start = 1 + 2 * (header.index(column) - 1)  # every matrix cell is two words
    return words[start : start + 2]


def test_plan_show_prints_the_plan_and_writes_nothing(tmp_path, qwen_trio, monkeypatch):
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"], qwen_trio["two"]]
    )
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path, *qwen_trio.values())
    shown = CliRunner().invoke(main, ["plan", str(recipe), "--show", "--quiet"])
    assert shown.exit_code == 0, shown.output
    assert _files(tmp_path, *qwen_trio.values()) == before

    header = next(line for line in shown.output.splitlines() if line[:6] == "layer ")
    assert header.split() == [
        "layer",
        "down_proj",
        "gate_proj",
        "up_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "v_proj",
        "rest",
    ]
    source, gap = _cell(shown.output, 1, "up_proj")
    assert source == "M2" and float(gap) > 0  # the planted flat matrix
    assert _cell(shown.output, 0, "q_proj")[0] != "M1"  # the planted rank-1 one
    assert "\noutside the layers: " in shown.output

    # The same table from a saved map, as from a merge's ner_source_map.json.
    planned = CliRunner().invoke(main, ["plan", str(recipe), "-o", "m.json"])
    assert planned.exit_code == 0, planned.output
    again = CliRunner().invoke(main, ["show", "m.json"])
    assert again.exit_code == 0 and again.output == shown.output


def test_plan_table_cells_are_consistent_with_the_map(merged):
    source_map = SourceMap.load(merged / "ner_source_map.json")
    table = report.plan_table(source_map)
    names = [model.name for model in source_map.models]
    for name, choice in source_map.tensors.items():
        if choice.scores and choice.layer is not None:
            column = short_labels(source_grid(source_map).columns)[
                tensor_type(name, choice.layer)
            ]
            assert _cell(table, choice.layer, column) == [
                f"M{names.index(choice.source)}",
                f"{margin(choice):+.1e}",
            ]
    norm = source_map.tensors["model.layers.0.input_layernorm.weight"]
    layer_0 = next(line for line in table.splitlines() if line.startswith("0 "))
    assert layer_0.split()[-1] == f"M{names.index(norm.source)}"  # rest


def test_cli_errors_are_readable(tmp_path, qwen_trio):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    neither = CliRunner().invoke(main, ["plan", str(recipe)])
    assert neither.exit_code == 2 and "--show" in neither.output
    missing = CliRunner().invoke(main, ["show", str(tmp_path / "nope.json")])
    assert missing.exit_code == 1
    assert "nope.json: cannot read source map" in missing.output
    assert missing.exception is None or isinstance(missing.exception, SystemExit)


def test_grid_names():
    assert tensor_type("model.layers.12.mlp.up_proj.weight", 12) == "mlp.up_proj.weight"
    assert tensor_type("lm_head.weight", None) == "lm_head.weight"
    columns = (
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "input_layernorm.weight",
        "model.norm.weight",
    )
    assert list(short_labels(columns).values()) == [
        "q_proj",
        "q_proj.bias",
        "k_proj.bias",
        "input_layernorm",
        "norm",
    ]
    scored = TensorChoice(
        source="b", rule="override", layer=0, shape=(2, 2), scores={"a": 0.9, "b": 0.7}
    )
    assert margin(scored) == pytest.approx(-0.2)  # an override that lost
    assert margin(scored.model_copy(update={"scores": {}})) is None
    nan_lost = scored.model_copy(update={"scores": {"a": None, "b": 0.7}})
    assert margin(nan_lost) is None  # no finite runner-up to compare with


def test_a_copy_without_a_score_leaves_a_gap(tmp_path, merged):
    """With `nonfinite: lose`, a NaN copy's score is null: drawn as a gap."""
    source_map = SourceMap.load(merged / "ner_source_map.json")
    name = "model.layers.1.mlp.up_proj.weight"
    choice = source_map.tensors[name]
    loser = next(m for m in choice.scores if m != choice.source)
    scores = {**choice.scores, loser: None}
    tensors = {**source_map.tensors, name: choice.model_copy(update={"scores": scores})}
    edited = source_map.model_copy(update={"tensors": tensors})
    profile = source_grid(edited).depth_profile("mlp.up_proj.weight")
    assert [layer for layer, _ in profile[loser]] == [0]
    write_figure(edited, tmp_path / "gap.png")
    assert f"M2 {margin(tensors[name]):+.1e}" in report.plan_table(edited)
