"""`merge_method: ner` for mergekit: copy each tensor from its planned source.

mergekit calls the method once per output tensor with every model's copy; the
source map says which copy to return, untouched, so each output tensor is
bit-identical to its source (in the recipe's dtype). The planning itself happens
before the merge (see `ner_merge.pipeline`), which passes the map's path in.
"""

import os

import torch
from mergekit.merge_methods import TensorGroup, merge_method, registry

from ner_merge.errors import SourceMapError
from ner_merge.recipe import METHOD_NAME
from ner_merge.source_map import load_cached


@merge_method(
    name=METHOD_NAME,
    pretty_name="NER layer selection",
    uses_accelerator=False,  # it only copies: keep tensors where they are
)
def ner_merge_method(group: TensorGroup, source_map: str) -> torch.Tensor:
    plan = load_cached(source_map, os.stat(source_map).st_mtime_ns)
    name = group.metadata.name
    choice = plan.tensors.get(name)
    if choice is None:
        raise SourceMapError(f"{source_map}: no entry for tensor {name}")
    source = plan.model(choice.source)
    for entry in group.entries:
        if str(entry.id) in (source.path, source.name):
            return entry.tensor
    given = ", ".join(str(entry.id) for entry in group.entries)
    raise SourceMapError(
        f"{source_map}: tensor {name} comes from {source.name} ({source.path}), "
        f"which is not among this merge's models ({given})"
    )


def register() -> None:
    """Make `merge_method: ner` available to mergekit; harmless when repeated."""
    if METHOD_NAME not in {m.spec.name for m in registry.registered_methods()}:
        registry.register(ner_merge_method)
