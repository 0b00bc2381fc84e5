"""The human-readable side of a merge: `ner_report.md`, its figure, a model-card
section, and the terminal table of `ner-merge show`.

The report lists, for every layer and tensor, each model's NER and the chosen
source, with per-model totals, and embeds the figure (`ner_merge.report.figure`). All of
it is written from the source map alone, so it is exactly as deterministic as the
map, except for the report's one `Created:` line.
"""

import datetime
import logging
from collections import Counter
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from ner_merge.models.names import parent
from ner_merge.plan.selection import RULES, unit_decisions
from ner_merge.plan.source_map import Follows, LoraPart, SourceMap, TensorChoice
from ner_merge.report.grid import Row, margin, model_labels, short_labels, source_grid

# The report writers need the planner's rules, the recipe and the model card,
# which import torch and mergekit; they are imported where used, so that
# `ner-merge show` (the plan table alone) starts without them.
if TYPE_CHECKING:
    from ner_merge.recipe.recipe import Recipe


LOG = logging.getLogger(__name__)

REPORT_FILE = "ner_report.md"
FIGURE_FILE = "ner_report.png"


def _follows_text(follows: Follows) -> str:
    if follows.kind == "layer":
        return "follows the majority of its layer"
    if follows.kind == "non-layer":
        return "follows the majority outside the layers"
    return f"follows {follows.name}"


def _rule_text(choice: TensorChoice) -> str:
    text = choice.rule
    if choice.rule == "follows" and choice.follows is not None:
        text = _follows_text(choice.follows)
    elif choice.rule == "highest-mean-ner":
        text = f"highest mean NER of {choice.unit}"
    if choice.refined:
        text += "; near tie, refined in float64"
    if choice.stabilized is not None:
        text += f"; stabilized, {choice.stabilized:.1%} base values"
    return text


def decision_counts(source_map: SourceMap) -> tuple[int, int]:
    """The decisions (a scored tensor or unit choosing its source), and how many
    of them were near ties refined in float64."""
    decisions = {c.unit or n for n, c in source_map.tensors.items() if c.scores}
    refined = {c.unit or n for n, c in source_map.tensors.items() if c.refined}
    return len(decisions), len(refined)


def scoring_summary(source_map: SourceMap) -> str:
    """How the decisions were scored: the route and why it was taken, how many
    decisions the float32 bounds settled, and how many near ties needed float64
    scores."""
    decisions, refined = decision_counts(source_map)
    scores = [s for c in source_map.tensors.values() for s in c.scores]
    route = source_map.route
    head = f"route {route.scoring} ({route.reason}); " if route else ""
    if source_map.options.get("compat") == "nerd":
        return f"{head}decisions: {decisions}; scores: {len(scores)}, NERD's rule"
    bounded = sum(len(c.bounds) for c in source_map.tensors.values())
    return (
        f"{head}decisions: {decisions}, of which {refined} near ties "
        f"refined in float64; scores: {len(scores)}, {bounded} float32 with bounds, "
        f"{len(scores) - bounded} exact"
    )


def _mean_text(score: float | None) -> str:
    return "NaN/Inf" if score is None else f"{score:.4f}"


def layer_sources(source_map: SourceMap) -> list[str]:
    """A table: per decoder layer, which models supply its tensors.

    One label per row means the layer is whole from one model, as
    `granularity: layer` guarantees; a unit's mean scores follow.
    """
    labels = model_labels(source_map)
    decisions = unit_decisions(source_map)
    lines = [
        "## Sources by layer",
        "",
        "| layer | sources (tensors) | chosen as one |",
        "|---|---|---|",
    ]
    by_layer: dict[int, Counter] = {}
    units: dict[int, set[str]] = {}
    for choice in source_map.tensors.values():
        if choice.layer is not None:
            by_layer.setdefault(choice.layer, Counter())[labels[choice.source]] += 1
            if choice.unit in decisions:
                units.setdefault(choice.layer, set()).add(choice.unit)
    for layer, counts in sorted(by_layer.items()):
        sources = ", ".join(f"{label} ({n})" for label, n in sorted(counts.items()))
        chosen = "; ".join(
            f"`{unit}` -> {labels[decisions[unit].source]} (mean "
            + ", ".join(
                f"{labels[model]} {_mean_text(score)}"
                for model, score in decisions[unit].scores.items()
            )
            + ")"
            for unit in sorted(units.get(layer, ()))
        )
        lines.append(f"| {layer} | {sources} | {chosen or '-'} |")
    return lines + [""]


def stabilized_modules(source_map: SourceMap) -> list[str]:
    """Share of base values per module after the stabilize stage (if it ran)."""
    shares: dict[str, list[float]] = {}  # module -> [base values, all values]
    for name, choice in source_map.tensors.items():
        if choice.stabilized is not None:
            size = prod(choice.shape)
            module = shares.setdefault(parent(name), [0.0, 0.0])
            module[0] += choice.stabilized * size
            module[1] += size
    if not shares:
        return []
    lines = [
        "## Stabilize: share of base values per module",
        "",
        "These tensors are not bit-identical to their source.",
        "",
        "| module | base values |",
        "|---|---|",
    ]
    for module, (from_base, size) in shares.items():
        lines.append(f"| `{module}` | {from_base / size:.2%} |")
    return lines + [""]


def _score_cell(choice: TensorChoice, model: str) -> str:
    """A model's NER for one tensor; bold for the source, '-' if not scored."""
    if model not in choice.scores:
        return "-"
    score = choice.scores[model]
    text = "NaN/Inf" if score is None else f"{score:.6f}"
    return f"**{text}**" if model == choice.source else text


def totals(source_map: SourceMap) -> dict[str, tuple[int, int]]:
    """Per model: (tensors supplied, parameters supplied)."""
    result = {model.name: (0, 0) for model in source_map.models}
    for choice in source_map.tensors.values():
        count, parameters = result[choice.source]
        result[choice.source] = (count + 1, parameters + prod(choice.shape))
    return result


def lora_lines(source_map: SourceMap) -> list[str]:
    """For each LoRA fine-tune: its base and adapter, and the folder mergekit
    merged them into (the one scored and merged from)."""
    lines = [
        f"- `{model.name}`: base `{model.lora.base.name}`{_found(model.lora.base)}, "
        f"adapter `{model.lora.adapter.name}`{_found(model.lora.adapter)} (BLAKE3 "
        f"{model.lora.adapter_hash[:16]}), merged by mergekit into `{model.path}`"
        for model in source_map.models
        if model.lora is not None
    ]
    return ["", "LoRA fine-tunes:", "", *lines] if lines else []


def _found(part: LoraPart) -> str:
    """Where a base or adapter was found, unless its name says it already."""
    if part.revision:
        return f" (commit {part.revision})"
    return "" if part.path == part.name else f" (`{part.path}`)"


def render_report(
    source_map: SourceMap, recipe: "Recipe", created: str, figure: str | None = None
) -> str:
    """The report; `figure`, the PNG's file name beside it, is embedded if given."""

    labels = model_labels(source_map)
    all_totals = totals(source_map)
    tensor_count = len(source_map.tensors)
    lines = [
        "# NER merge report",
        "",
        f"Created: {created}",
        f"Recipe: {recipe.where}",
        "",
    ]
    if figure:
        lines += [f"![Source of each tensor and NER along the depth]({figure})", ""]
    lines += [
        "## Models",
        "",
        "| label | model | role | revision | tensors | share | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in source_map.models:
        count, parameters = all_totals[model.name]
        lines.append(
            f"| {labels[model.name]} | `{model.name}` | {model.role} | "
            f"{model.revision or 'local'} | {count} | {count / tensor_count:.1%} | "
            f"{parameters:,} |"
        )
    lines += lora_lines(source_map)
    lines += ["", "## How sources were chosen", "", RULES, ""]
    lines += [
        "Options: " + (str(source_map.options) if source_map.options else "defaults"),
        "",
        "Scoring: " + scoring_summary(source_map) + ". A float32 score's bound "
        "(`bounds` in the source map) is how far it may lie from its float64 "
        "score; a decision stands on float32 scores only when the bounds cannot "
        "change it, so every source is the one float64 scores give.",
        "",
    ]
    lines += layer_sources(source_map) + stabilized_modules(source_map)
    header = " | ".join(labels.values())
    by_layer: dict[int | None, list[tuple[str, TensorChoice]]] = {}
    for name, choice in source_map.tensors.items():
        by_layer.setdefault(choice.layer, []).append((name, choice))
    for layer, rows in sorted(
        by_layer.items(), key=lambda item: (item[0] is not None, item[0] or 0)
    ):
        title = "Outside the layers" if layer is None else f"Layer {layer}"
        lines += [f"## {title}", "", f"| tensor | shape | {header} | source | rule |"]
        lines.append("|---|---|" + "---|" * len(labels) + "---|---|")
        for name, choice in rows:
            scores = " | ".join(_score_cell(choice, model) for model in labels)
            shape = "x".join(str(d) for d in choice.shape)
            lines.append(
                f"| `{name}` | {shape} | {scores} | {labels[choice.source]} | "
                f"{_rule_text(choice)} |"
            )
        lines.append("")
    return "\n".join(lines)


def card_section(source_map: SourceMap, figure: str | None = None) -> str:
    """A short model-card section: the method, each model's share, the report."""
    all_totals = totals(source_map)
    tensor_count = len(source_map.tensors)
    lines = [
        "",
        "## NER layer selection",
        "",
        "Each tensor of this model was copied unchanged from the model whose copy has "
        "the highest Normalized Effective Rank (entropy of its normalized singular "
        "values over its maximum); biases and norms travel with their matrices.",
        "",
        "| model | role | tensors | share |",
        "|---|---|---|---|",
    ]
    for model in source_map.models:
        count, _ = all_totals[model.name]
        lines.append(
            f"| `{model.name}` | {model.role} | {count} | {count / tensor_count:.1%} |"
        )
    lines += [
        "",
        f"Per-tensor scores and sources: [{REPORT_FILE}]({REPORT_FILE}); "
        "machine-readable: `ner_source_map.json`.",
        "",
    ]
    if figure:
        lines += [f"At a glance, by layer: [{figure}]({figure}).", ""]
    return "\n".join(lines)


def plan_table(source_map: SourceMap) -> str:
    """A compact terminal table: per layer, each matrix's source and margin.

    A cell reads `M2 +1.2e-02`: the matrix comes from M2, whose NER beat the
    runner-up's by 0.012. Biases travel with their matrix and are not shown;
    `rest` lists the sources of the layer's other tensors (its norms).
    """
    grid = source_grid(source_map)
    labels = model_labels(source_map)
    names = short_labels(grid.columns)

    def cell(choice: TensorChoice | None) -> str:
        if choice is None:
            return ""
        difference = margin(choice)
        label = labels[choice.source]
        return label if difference is None else f"{label} {difference:+.1e}"

    def rest(row: Row) -> str:
        sources = {
            labels[choice.source]
            for (where, _), choice in grid.cells.items()
            if where == row
            and not choice.scores
            and (choice.follows is None or choice.follows.kind != "tensor")
        }
        return ",".join(sorted(sources))

    columns = grid.scored_columns()
    table = [["layer", *(names[c] for c in columns), "rest"]]
    for row in grid.rows:
        if row is not None:
            table.append(
                [
                    str(row),
                    *(cell(grid.cells.get((row, c))) for c in columns),
                    rest(row),
                ]
            )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = [
        *(
            f"{labels[model.name]} {model.role:<10}  {model.name}"
            for model in source_map.models
        ),
        "cell: source, margin (its NER minus the runner-up's)",
        "rest: sources of the layer's norms and other unscored tensors",
        "",
        *(
            "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
            for line in table
        ),
    ]
    if None in grid.rows:
        outside = [
            f"{names[column]} {cell(grid.cells[(None, column)])}"
            for column in grid.columns
            if (None, column) in grid.cells and grid.cells[(None, column)].scores
        ]
        if rest(None):
            outside.append(f"rest {rest(None)}")
        lines.append("outside the layers: " + ", ".join(outside))
    shares = source_map.share_by_model().items()
    total = len(source_map.tensors)
    lines.append(
        "tensors: " + ", ".join(f"{labels[n]} {k} ({k / total:.0%})" for n, k in shares)
    )
    lines.append(scoring_summary(source_map))
    return "\n".join(lines)


def write_figure(out: Path, source_map: SourceMap) -> str | None:
    """Write the figure into OUT; its file name, or None without matplotlib."""
    try:
        from ner_merge.report.figure import write_figure as draw
    except ImportError as error:  # matplotlib is optional: the `report` extra
        LOG.warning(
            "skipping %s: %s (install the extra: pip install 'ner-merge[report]')",
            FIGURE_FILE,
            error,
        )
        return None
    draw(source_map, out / FIGURE_FILE)
    return FIGURE_FILE


def write_report(out: Path, source_map: SourceMap, recipe: "Recipe") -> None:
    """Write the report and figure into OUT and extend mergekit's model card."""
    from ner_merge.report.card import CARD_FILE

    created = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )
    figure = write_figure(out, source_map)
    (out / REPORT_FILE).write_text(
        render_report(source_map, recipe, created, figure), encoding="utf-8"
    )
    card = out / CARD_FILE
    if card.exists():
        with card.open("a", encoding="utf-8") as file:
            file.write(card_section(source_map, figure))
