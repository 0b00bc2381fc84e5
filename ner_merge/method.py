"""`merge_method: ner` for mergekit: copy each tensor from its planned source.

mergekit calls the method once per output tensor with every model's copy; the
source map says which copy to return, untouched, so each output tensor is
bit-identical to its source (in the recipe's dtype). The one exception is a
tensor the map marks `stabilized` (NERD's second stage, `stabilize: true`): it is
returned with the base's values put back, and the count of them must equal the
planned one. The planning itself happens before the merge (see
`ner_merge.pipeline`), which passes the map's path in.
"""

import os

import torch
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods import TensorGroup, merge_method, registry

from ner_merge.errors import SourceMapError
from ner_merge.nerd import stabilize
from ner_merge.recipe import METHOD_NAME
from ner_merge.source_map import ModelEntry, load_cached


@merge_method(
    name=METHOD_NAME,
    pretty_name="NER layer selection",
    uses_accelerator=False,  # it only copies: keep tensors where they are
)
def ner_merge_method(group: TensorGroup, source_map: str) -> torch.Tensor:
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
    """Make `merge_method: ner` available to mergekit; harmless when repeated."""
    if METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(ner_merge_method)
