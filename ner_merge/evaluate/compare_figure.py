"""The PNG figure of a comparison's perplexities (`ner-merge compare`): a panel
per text, a bar per model (inputs, then merges) with its perplexity printed on
it, `*` on the best; each panel's axis starts just below its smallest value, so
that differences of a few percent show.

It belongs to evaluation, whose table it draws; the palette and the reproducible
saving are the merge figure's (`ner_merge.report.figure`), so a model keeps its colour.
matplotlib is the optional `report` extra: `ner_merge.evaluate.compare` imports this
module only when it draws, and skips the figure without it.
"""

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ner_merge.evaluate.perplexity import PerplexityTable
from ner_merge.evaluate.words import plural
from ner_merge.report.figure import DPI, model_colour


def draw_comparison(table: PerplexityTable) -> Figure:
    """A panel per text, a bar per model (table order, a colour each), its value
    printed on it and `*` on the best. Each panel's axis starts just below its
    smallest value: perplexities of close merges differ by a few percent, which
    bars from 0 would hide."""
    count = len(table.models)
    figure = Figure(
        figsize=(max(8.0, 2.5 + len(table.texts) * (0.55 * count + 0.6)), 4.5),
        dpi=DPI,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, len(table.texts), squeeze=False)[0]
    best = table.best()
    for column, (axes, text) in enumerate(zip(panels, table.texts)):
        values = [row[column] for row in table.values]
        low, high = _value_range(values)
        bars = axes.bar(
            range(count),
            [value - low for value in values],
            bottom=low,
            color=[model_colour(index) for index in range(count)],
            label=list(table.models),
        )
        labels = [
            f"{value:.2f}{'*' if value == best[column] else ''}" for value in values
        ]
        axes.bar_label(bars, labels, fontsize=7, rotation=90, padding=2)
        axes.set_ylim(low, high)
        axes.set_xticks([])
        axes.set_title(text, fontsize=9)
        axes.tick_params(labelsize=7)
    panels[0].set_ylabel("perplexity (axis not from 0)")
    figure.suptitle(
        f"Perplexity on {plural(len(table.texts), 'text')}, lower is better; "
        f"* = best ({table.device})"
    )
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right upper", fontsize=8)
    return figure


def _value_range(values: list[float]) -> tuple[float, float]:
    """A panel's axis: from a little below the smallest value (never below 0)
    to room above the largest for its printed value."""
    low, high = min(values), max(values)
    spread = high - low or abs(high) * 0.05 or 1.0
    return max(0.0, low - 0.5 * spread), high + 0.6 * spread


def write_comparison_figure(table: PerplexityTable, path: Path) -> None:
    """Draw the comparison and save it as a PNG at `path`, reproducibly."""
    draw_comparison(table).savefig(path, dpi=DPI, metadata={"Software": None})
