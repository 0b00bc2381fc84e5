"""The PNG figure of a merge at a glance: where each tensor came from, and why.

Top: a heat map of decoder layers (rows) by tensor type
(columns), each cell coloured by the model its tensor was copied from. Below:
one small panel per scored tensor type, with each model's NER of that tensor
down the layers; at every layer the highest line is the heat map's colour in
that column, so the panels show how clear each choice was.

matplotlib is the optional `report` extra: importing this module fails without
it, and `ner_merge.report.markdown` then skips the figure. The figure is drawn on the
Agg canvas directly, without pyplot, so no GUI backend or global state is involved,
and it is saved without the `Software` metadata: the same map gives the same bytes.
"""

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ner_merge.plan.source_map import SourceMap
from ner_merge.report.grid import SourceGrid, model_labels, short_labels, source_grid

# The base is grey so that the cells where a fine-tune won stand out; fine-tunes
# take matplotlib's tab10 colours in recipe order (grey left out), cycling.
BASE_COLOUR = "#9a9a9a"
FINE_TUNE_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
)
EMPTY_COLOUR = "#ffffff"  # a cell with no tensor (e.g. a layer row, head column)
DPI = 100
PANELS_PER_ROW = 4
CELL_INCHES = 0.32  # heat-map cell height; columns share the figure's width


def model_colour(index: int) -> str:
    """The colour of the model at `index` in the map (0 is the base)."""
    if index == 0:
        return BASE_COLOUR
    return FINE_TUNE_COLOURS[(index - 1) % len(FINE_TUNE_COLOURS)]


def draw_figure(source_map: SourceMap) -> Figure:
    """The whole figure; its first axes is the heat map, cell (row r, column c)
    centred on data coordinates (c, r)."""
    grid = source_grid(source_map)
    scored = grid.scored_columns()
    panel_columns = max(1, min(PANELS_PER_ROW, len(scored)))
    panel_rows = math.ceil(len(scored) / panel_columns)
    # Room for the legend (a line per model) and the rotated column labels.
    heat_height = CELL_INCHES * len(grid.rows) + 2.0 + 0.2 * len(grid.models)
    width = max(10.0, 0.45 * len(grid.columns) + 4.0)
    figure = Figure(
        figsize=(width, heat_height + 2.4 * panel_rows + 0.6),
        dpi=DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    layout = figure.add_gridspec(
        1 + panel_rows,
        panel_columns,
        height_ratios=[heat_height] + [2.4] * panel_rows,
    )
    _draw_heat_map(figure.add_subplot(layout[0, :]), grid, source_map)
    for index, column in enumerate(scored):
        row, position = divmod(index, panel_columns)
        _draw_profile(figure.add_subplot(layout[1 + row, position]), grid, column)
    return figure


def _draw_heat_map(axes, grid: SourceGrid, source_map: SourceMap) -> None:
    empty = to_rgb(EMPTY_COLOUR)
    image = [
        [empty if index is None else to_rgb(model_colour(index)) for index in row]
        for row in grid.source_indices()
    ]
    axes.imshow(image, aspect="auto", interpolation="nearest")
    labels = short_labels(grid.columns)
    axes.set_xticks(range(len(grid.columns)))
    axes.set_xticklabels(
        [labels[c] for c in grid.columns], rotation=45, ha="right", fontsize=8
    )
    axes.set_yticks(range(len(grid.rows)))
    axes.set_yticklabels(
        ["outside" if row is None else f"layer {row}" for row in grid.rows],
        fontsize=8,
    )
    # Thin white lines between cells keep neighbours of one colour countable.
    axes.set_xticks([x - 0.5 for x in range(1, len(grid.columns))], minor=True)
    axes.set_yticks([y - 0.5 for y in range(1, len(grid.rows))], minor=True)
    axes.grid(which="minor", color="white", linewidth=1.5)
    axes.tick_params(which="minor", length=0)
    axes.set_title("Source of each tensor (colour = model it was copied from)")
    shares = source_map.share_by_model()
    total = len(source_map.tensors)
    labels_by_model = model_labels(source_map)
    handles = [
        Patch(
            color=model_colour(index),
            label=f"{labels_by_model[model.name]} {model.name} ({model.role}): "
            f"{shares[model.name] / total:.0%} of tensors",
        )
        for index, model in enumerate(source_map.models)
    ]
    # Above the heat map, not beside it: model names can be long Hub ids or paths.
    axes.figure.legend(handles=handles, loc="outside upper left", fontsize=8)


def _draw_profile(axes, grid: SourceGrid, column: str) -> None:
    for index, points in enumerate(grid.depth_profile(column).values()):
        layers = [layer for layer, _ in points]
        scores = [score for _, score in points]
        axes.plot(layers, scores, marker="o", markersize=3, color=model_colour(index))
    axes.set_title(f"NER of {short_labels(grid.columns)[column]}", fontsize=9)
    axes.set_xlabel("layer", fontsize=8)
    axes.set_ylabel("NER", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.xaxis.get_major_locator().set_params(integer=True)


def write_figure(source_map: SourceMap, path: Path) -> None:
    """Draw the figure and save it as a PNG at `path`, byte-for-byte reproducible."""
    draw_figure(source_map).savefig(path, dpi=DPI, metadata={"Software": None})
