"""Granularity: which tensors of a decoder layer choose their source as one unit.

Units are derived from tensor names and the layer index mergekit's architecture
tables give each tensor, never from family-specific names:

- the *layer prefix* of a tensor in layer i is its name up to the first dotted
  segment equal to i (`model.layers.3`, `encoder.layer.3`, `transformer.h.3`);
- a *block* is a direct child module of the layer (`model.layers.3.self_attn`,
  `model.layers.3.mlp`; BERT: `attention`, `intermediate`, `output`). A block
  that holds scored weights chooses as one at `granularity: module`; a norm that
  sits directly under the layer is a child without scored weights, and follows
  the layer rule instead.
"""

from ner_merge.options import Granularity


def layer_prefix(name: str, layer: int) -> str:
    """`model.layers.3.mlp.up_proj.weight`, 3 -> `model.layers.3`."""
    parts = name.split(".")
    end = parts.index(str(layer))  # the first segment equal to the index
    return ".".join(parts[: end + 1])


def unit_of(name: str, layer: int | None, granularity: Granularity) -> str | None:
    """The unit a tensor chooses with at this granularity; None: it chooses alone.

    Outside the decoder layers (embeddings, lm_head, final norm) every granularity
    behaves like `tensor`.
    """
    if granularity == "tensor" or layer is None:
        return None
    prefix = layer_prefix(name, layer)
    if granularity == "layer":
        return prefix
    child = name[len(prefix) + 1 :].split(".", 1)[0]
    return f"{prefix}.{child}"
