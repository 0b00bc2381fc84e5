"""A source map seen as a grid: decoder layers (rows) by tensor type (columns).

The figure and `ner-merge show` both draw this grid, so they agree cell for cell
with each other and with the map. A tensor type is the tensor's name with its
layer prefix removed (`model.layers.3.mlp.up_proj.weight` -> `mlp.up_proj.weight`),
so one column follows one kind of weight down the depth of the model. Tensors
outside the decoder layers (embeddings, final norm, head) have no depth: they
share one extra, last row with a column each.

Rows and columns are sorted, not taken in map order: a map loaded from JSON has
its tensors in key order, a fresh plan in architecture order, and both must draw
the same grid.
"""

from dataclasses import dataclass

from ner_merge.models.names import tensor_type
from ner_merge.plan.source_map import SourceMap, TensorChoice

Row = int | None  # a decoder layer index; None for the tensors outside the layers


def model_labels(source_map: SourceMap) -> dict[str, str]:
    """Short labels for tables and legends: M0 is the base, M1... the fine-tunes."""
    return {model.name: f"M{index}" for index, model in enumerate(source_map.models)}


def margin(choice: TensorChoice) -> float | None:
    """The source's NER minus the best other model's; None if either is missing.

    The margin says how close a choice was: near 0, the models were almost equal
    and the choice hardly matters. Negative, the source is not this tensor's best
    copy: normal at `module` or `layer` granularity, where a block or layer goes
    to the best mean and its winner need not win each tensor; otherwise
    `keep_base`, an `exclude` or a hand edit decided. A copy holding NaN or Inf
    has no score (null in the map) and is left out.
    """
    score = choice.scores.get(choice.source)
    others = [
        other
        for name, other in choice.scores.items()
        if name != choice.source and other is not None
    ]
    if score is None or not others:
        return None
    return score - max(others)


def short_labels(columns: tuple[str, ...]) -> dict[str, str]:
    """Each column's shortest trailing part of its name that is still unique.

    `self_attn.q_proj.weight` becomes `q_proj`, `self_attn.q_proj.bias` becomes
    `q_proj.bias`: a trailing `.weight` is dropped, then leading parts while no
    two columns would read the same.
    """
    parts = {column: column.removesuffix(".weight").split(".") for column in columns}
    labels = {}
    for column, words in parts.items():
        for start in range(len(words) - 1, -1, -1):
            candidate = words[start:]
            if all(
                other[-len(candidate) :] != candidate
                for name, other in parts.items()
                if name != column
            ):
                break
        labels[column] = ".".join(candidate)
    return labels


@dataclass(frozen=True)
class SourceGrid:
    """The map's tensors placed in cells; a cell without a tensor is absent."""

    models: tuple[str, ...]  # model names, base first: the index is the label's number
    rows: tuple[Row, ...]  # layers in order, then None if anything is outside them
    columns: tuple[str, ...]  # layer tensor types, then the outside tensors' names
    cells: dict[tuple[Row, str], TensorChoice]

    def source_index(self, row: Row, column: str) -> int | None:
        """Index in `models` of the cell's source; None for an empty cell."""
        choice = self.cells.get((row, column))
        return None if choice is None else self.models.index(choice.source)

    def source_indices(self) -> list[list[int | None]]:
        """The heat map: one list per row of each column's source index."""
        return [[self.source_index(r, c) for c in self.columns] for r in self.rows]

    def scored_columns(self) -> tuple[str, ...]:
        """Layer tensor types with a scored tensor (a matrix), in column order."""
        scored = {
            column
            for (row, column), choice in self.cells.items()
            if row is not None and choice.scores
        }
        return tuple(column for column in self.columns if column in scored)

    def depth_profile(self, column: str) -> dict[str, list[tuple[int, float]]]:
        """Per model, (layer, NER) of its copy of `column` down the layers; a copy
        without a score (NaN or Inf) leaves a gap."""
        profile: dict[str, list[tuple[int, float]]] = {name: [] for name in self.models}
        for row in self.rows:
            choice = self.cells.get((row, column))
            if row is None or choice is None:
                continue
            for name, score in choice.scores.items():
                if score is not None:
                    profile[name].append((row, score))
        return profile


def source_grid(source_map: SourceMap) -> SourceGrid:
    """Place every tensor of the map in its (layer, tensor type) cell."""
    cells = {
        (choice.layer, tensor_type(name, choice.layer)): choice
        for name, choice in source_map.tensors.items()
    }
    layers = sorted({row for row, _ in cells if row is not None})
    inside = sorted({column for row, column in cells if row is not None})
    outside = sorted({column for row, column in cells if row is None})
    return SourceGrid(
        models=tuple(model.name for model in source_map.models),
        rows=(*layers, None) if outside else tuple(layers),
        columns=tuple(dict.fromkeys((*inside, *outside))),
        cells=cells,
    )
