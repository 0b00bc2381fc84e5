"""The human-readable side of a merge: `ner_report.md` and a model-card section.

The report lists, for every layer and tensor, each model's NER and the chosen
source, with per-model totals. It is written from the source map alone, so it is
exactly as deterministic as the map, except for its one `Created:` line.
"""

import datetime
from pathlib import Path

from ner_merge.planner import RULES
from ner_merge.recipe import Recipe
from ner_merge.source_map import SourceMap, TensorChoice

REPORT_FILE = "ner_report.md"
CARD_FILE = "README.md"


def _labels(source_map: SourceMap) -> dict[str, str]:
    """Short column labels: M0 is the base, M1... the fine-tuned models."""
    return {model.name: f"M{index}" for index, model in enumerate(source_map.models)}


def _rule_text(choice: TensorChoice) -> str:
    if choice.rule == "follows":
        return f"follows {choice.follows}"
    return choice.rule


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
        size = 1
        for dimension in choice.shape:
            size *= dimension
        result[choice.source] = (count + 1, parameters + size)
    return result


def render_report(source_map: SourceMap, recipe: Recipe, created: str) -> str:
    labels = _labels(source_map)
    all_totals = totals(source_map)
    tensor_count = len(source_map.tensors)
    lines = [
        "# NER merge report",
        "",
        f"Created: {created}",
        f"Recipe: {recipe.where}",
        "",
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
    lines += ["", "## How sources were chosen", "", RULES, ""]
    lines += [
        "Options: " + (str(source_map.options) if source_map.options else "defaults"),
        "",
    ]
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


def card_section(source_map: SourceMap) -> str:
    """A short model-card section: the method and each model's share."""
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
    return "\n".join(lines)


def write_report(out: Path, source_map: SourceMap, recipe: Recipe) -> None:
    """Write the report into OUT and extend mergekit's model card, if there is one."""
    created = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )
    (out / REPORT_FILE).write_text(
        render_report(source_map, recipe, created), encoding="utf-8"
    )
    card = out / CARD_FILE
    if card.exists():
        with card.open("a", encoding="utf-8") as file:
            file.write(card_section(source_map))
