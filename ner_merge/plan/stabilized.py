"""The stabilize stage's shares: how much of each chosen tensor NERD's second
stage puts back from the base, computed so the source map can state it.

It is a step of making the plan (a choice in, the same choice with its share
out), so it lives with the plan and reads copies through scoring's reader.
"""

import torch

from ner_merge.models.inventory import OutputTensor
from ner_merge.plan.source_map import TensorChoice
from ner_merge.scoring.nerd import stabilize, stabilizes
from ner_merge.scoring.streamed import CopyReader


def stabilized(
    tensors: list[OutputTensor],
    choices: dict[str, TensorChoice],
    reader: CopyReader,
    names: list[str],
    dtype: torch.dtype | None,
) -> dict[str, TensorChoice]:
    """Choices with the share of base values the stabilize stage puts back, in
    every `.weight` not taken from the base (NERD's stage 2 leaves biases alone).

    Computed on the copies exactly as the merge method will see them (cast to the
    recipe's dtype, aligned), with the same function, so the map states what the
    merge writes. Only the base's and the chosen copy are read, except for a
    token-indexed tensor under a tokenizer option, which aligns every copy.
    A choice that already states its share (a hand-edited map) keeps it.
    """
    result = dict(choices)
    for tensor in tensors:
        choice = choices[tensor.name]
        source = names.index(choice.source)
        if (
            not tensor.is_float
            or source == 0
            or not stabilizes(tensor.name)
            or choice.stabilized is not None
        ):
            continue
        if reader.is_aligned(tensor):
            copies = list(reader.copies(tensor, dtype))
            base, chosen = copies[0], copies[source]
        else:
            base, chosen = (reader.copy(tensor, i, dtype) for i in (0, source))
        _, from_base = stabilize(base, chosen)
        result[tensor.name] = choice.model_copy(
            update={"stabilized": from_base / base.numel()}
        )
    return result
