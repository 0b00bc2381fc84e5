"""The structure of a tensor's name, from the name and its layer index alone.

mergekit's architecture tables give every tensor its name and, inside the
decoder layers, its layer index; everything else is read off the name, so no
model family is hard-coded:

- the *parent* of `X.weight` or `X.bias` is the module `X`;
- the *layer prefix* of a tensor in layer i is its name up to the first dotted
  segment equal to i (`model.layers.3`, `encoder.layer.3`, `transformer.h.3`);
- its *tensor type* is the rest of the name (`mlp.up_proj.weight`): one kind of
  weight followed down the depth of the model;
- its *block* is the layer's direct child module that holds it
  (`model.layers.3.self_attn`; BERT: `attention`, `intermediate`, `output`).

A name that does not carry its layer index as a segment has no layer prefix: it
is treated like a tensor outside the layers (it chooses alone, and its type is
its whole name), the same everywhere.
"""

from typing import Literal

Granularity = Literal["tensor", "module", "layer"]


def parent(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `model.layers.3.mlp.up_proj`."""
    return name.rsplit(".", 1)[0]


def layer_prefix(name: str, layer: int | None) -> str | None:
    """`model.layers.3.mlp.up_proj.weight`, 3 -> `model.layers.3`; None when the
    tensor is outside the layers or its name lacks the index."""
    if layer is None:
        return None
    parts = name.split(".")
    if str(layer) not in parts[:-1]:
        return None
    return ".".join(parts[: parts.index(str(layer)) + 1])


def tensor_type(name: str, layer: int | None) -> str:
    """The name without its layer prefix (the whole name outside the layers)."""
    prefix = layer_prefix(name, layer)
    return name if prefix is None else name[len(prefix) + 1 :]


def unit_of(name: str, layer: int | None, granularity: Granularity) -> str | None:
    """The unit a tensor chooses its source with; None: it chooses alone.

    `module`: its block; `layer`: its layer. Outside the layers (embeddings,
    lm_head, final norm) every granularity chooses tensor by tensor.
    """
    prefix = layer_prefix(name, layer)
    if granularity == "tensor" or prefix is None:
        return None
    if granularity == "layer":
        return prefix
    return f"{prefix}.{tensor_type(name, layer).split('.', 1)[0]}"
