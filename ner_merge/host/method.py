"""`merge_method: ner` for mergekit: copy each tensor from its planned source.

mergekit calls the method once per output tensor with every model's copy; the
source map says which copy to return, untouched, so each output tensor is
bit-identical to its source (in the recipe's dtype). The one exception is a
tensor the map marks `stabilized` (NERD's second stage, `stabilize: true`): it is
returned with the base's values put back, and the count of them must equal the
planned one. The planning itself happens before the merge (see
`ner_merge.host.pipeline`), which passes the map's path in.

Without a map (mergekit's in-memory API, `merge_tensors` and `merge_state_dicts`)
each tensor chooses alone, among the copies it is given: see `_highest_ner_copy`.
"""

import os

import torch
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods import TensorEntry, TensorGroup, merge_method, registry

from ner_merge.errors import ModelError, SourceMapError
from ner_merge.host.mergekit_range import check_mergekit
from ner_merge.plan.selection import first_best
from ner_merge.plan.source_map import ModelEntry, load_cached
from ner_merge.recipe.recipe import METHOD_NAME
from ner_merge.scoring.ner import NonFiniteMatrixError, normalized_effective_rank
from ner_merge.scoring.nerd import stabilize


@merge_method(
    name=METHOD_NAME,
    pretty_name="NER layer selection",
    uses_accelerator=False,  # it only copies: keep tensors where they are
)
def ner_merge_method(group: TensorGroup, source_map: str | None = None) -> torch.Tensor:
    if source_map is None:
        return _highest_ner_copy(group)
    # mergekit keeps every input shard memory-mapped for the whole merge, and each
    # page read stays resident: memory would grow with the models. The group's
    # tensors are loaded by now; closing the shards keeps one tensor per model.
    LoaderCache().flush_all()
    plan = load_cached(source_map, os.stat(source_map).st_mtime_ns)
    name = group.metadata.name
    choice = plan.tensors.get(name)
    if choice is None:
        raise SourceMapError(f"{source_map}: no entry for tensor {name}")
    chosen = _copy_of(group, plan.model(choice.source), source_map, name)
    if choice.stabilized is None:
        return chosen
    base = _copy_of(group, plan.base, source_map, name)
    result, from_base = stabilize(base, chosen)
    if from_base != round(choice.stabilized * base.numel()):
        raise SourceMapError(
            f"{source_map}: tensor {name}: stabilize takes {from_base} base values, "
            f"the plan says {choice.stabilized:.6f} of {base.numel()}: the inputs "
            "differ from the planned ones (another dtype?); plan again"
        )
    return result


def _highest_ner_copy(group: TensorGroup) -> torch.Tensor:
    """The copy with the highest NER, for a caller that planned nothing.

    Only 2-D floating-point tensors are scored; any other tensor (a bias, a
    norm, an integer buffer) comes from the base, or from the first input when
    none is marked base, because without the other tensors of its module and
    layer there is nothing to follow (a planned merge applies the full rules,
    see `ner_merge.plan.selection.RULES`). Ties go to the base, then to the earlier
    input. A copy holding NaN or Inf is an error naming it.
    """
    candidates = [entry for entry in group.entries if entry.is_base] + [
        entry for entry in group.entries if not entry.is_base
    ]
    first = candidates[0].tensor
    if not (first.is_floating_point() and first.ndim == 2):
        return first
    scores = [_score(entry, group.metadata.name) for entry in candidates]
    return candidates[first_best(scores)].tensor


def _score(entry: TensorEntry, name: str | None) -> float:
    try:
        return normalized_effective_rank(entry.tensor)
    except NonFiniteMatrixError:
        raise ModelError(
            f"tensor {name or '(unnamed)'}: input {entry.id!r} holds NaN or Inf values"
        ) from None


def _copy_of(
    group: TensorGroup, model: ModelEntry, source_map: str, name: str
) -> torch.Tensor:
    """The given model's copy of the tensor in this group, found by the path the
    pipeline set from the recipe (never a path the map alone gives)."""
    for entry in group.entries:
        if str(entry.id) == model.path:
            return entry.tensor
    given = ", ".join(str(entry.id) for entry in group.entries)
    raise SourceMapError(
        f"{source_map}: tensor {name} comes from {model.name} ({model.path}), "
        f"which is not among this merge's models ({given})"
    )


def register() -> None:
    """Make `merge_method: ner` available to mergekit; harmless when repeated.
    Refused, in one line, with a mergekit outside the supported range."""
    check_mergekit()
    if METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(ner_merge_method)
