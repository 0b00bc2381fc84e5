"""The inventory: the recipe's models found on disk, and every output tensor.

Output tensor names come from mergekit's architecture tables for the base's
configuration, never from a family's names; each is then found in every model
(under an alias, say), with all missing tensors, shape mismatches and layer-count
differences collected and reported together, before anything is scored.
"""

import os
from dataclasses import dataclass
from math import prod

from mergekit.architecture import ModelArchitecture, get_architecture_info
from mergekit.architecture.base import ConfiguredModuleArchitecture, WeightInfo
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from ner_merge.errors import ModelError
from ner_merge.models.lora import resolve_lora_model
from ner_merge.models.names import parent
from ner_merge.models.reader import DTYPES
from ner_merge.models.resolve import ResolvedModel, resolve_model
from ner_merge.models.vocabulary import FIX_HINT, VocabularyAlignment
from ner_merge.recipe.recipe import Recipe, candidate_models

FLOAT_DTYPES = {name for name, dtype in DTYPES.items() if dtype.is_floating_point}


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model, and what each candidate stores for it."""

    name: str
    layer: int | None
    shape: tuple[int, ...]
    is_float: bool
    # Per candidate: the name in its files (an alias, say); None where it lacks it.
    stored_names: tuple[str | None, ...]
    aligned_axis: int | None = None  # token axis mergekit re-indexes (vocabulary.py)
    base_only: bool = False  # an optional tensor some models lack: from the base
    force_dtype: str | None = None  # the architecture's dtype for it (mergekit's)

    @property
    def is_matrix(self) -> bool:
        return self.is_float and len(self.shape) == 2

    @property
    def parent(self) -> str:
        return parent(self.name)


def localized_config(recipe: Recipe, models: list[ResolvedModel]) -> MergeConfiguration:
    """The recipe's configuration with every model replaced by its local folder.

    mergekit then reads exactly the files that were planned (the resolved Hub
    commit, not whatever is newest) and never asks the Hub again.
    """
    return with_local_models(recipe.config, models)


def with_local_models(
    config: MergeConfiguration, models: list[ResolvedModel]
) -> MergeConfiguration:
    """Any `base_model` + `models` configuration (an NER recipe, a plain average)
    with each model replaced by its resolved folder; `models` are resolved from
    `candidate_models(config)`, in that order."""
    local = {
        ref: ModelReference.parse(m.path)
        for ref, m in zip(candidate_models(config), models)
    }
    base = config.base_model
    return config.model_copy(
        update={
            "base_model": local[base] if base else None,
            "models": [
                model.model_copy(update={"model": local[model.model]})
                for model in config.models or []
            ],
        }
    )


def resolve_models(
    recipe: Recipe, options: MergeOptions | None = None
) -> list[ResolvedModel]:
    """Resolve every candidate (a LoRA fine-tune merged as mergekit will, with
    `options`), read each one's index and headers up front, and refuse one model
    given twice under two names."""
    options = options or MergeOptions()
    models = [
        resolve_lora_model(reference, options)
        if reference.lora
        else resolve_model(reference)
        for reference in recipe.candidates()
    ]
    _refuse_one_folder_twice(models, recipe.where)
    for model in models:  # fail now, naming the model, not mid-plan
        model.headers  # noqa: B018
        model.config  # noqa: B018
    for index, first in enumerate(models):
        for second in models[index + 1 :]:
            if same_content(first, second):
                adapters = [
                    f" (adapter {model.adapter.path} changes no tensor of "
                    f"{model.base.path})"
                    for model in (first, second)
                    if model.adapter is not None and model.base is not None
                ]
                raise ModelError(
                    f"{recipe.where}: models {first.name} and {second.name} hold "
                    "the same weights (every tensor identical); list each model once"
                    + "".join(adapters)
                )
    return models


def _refuse_one_folder_twice(models: list[ResolvedModel], where: str) -> None:
    """Two spellings of one folder (`x/sea`, `x/../models/sea`, a symbolic link,
    `org/name` and `org/name@main`) would be scored twice and then refused by
    mergekit ("Duplicate merge inputs") only once the plan is done."""
    seen: dict[str, ResolvedModel] = {}
    for model in models:
        real = os.path.realpath(model.path)
        if real in seen:
            raise ModelError(
                f"{where}: models {seen[real].name} and {model.name} are one folder "
                f"({real}); list each model once"
            )
        seen[real] = model


def same_content(first: ResolvedModel, second: ResolvedModel) -> bool:
    """Whether two models hold the same tensors byte for byte (equal content
    fingerprints), reading as little as possible.

    Fingerprints would read every tensor of a model not yet indexed before the
    plan starts. Distinct models of one family differ somewhere, almost always
    already in a norm or a bias, so tensors are compared smallest first and the
    first difference ends it; the digests read are kept for the plan.
    """
    layout = {name: (h.dtype, h.shape) for name, h in first.headers.items()}
    if layout != {name: (h.dtype, h.shape) for name, h in second.headers.items()}:
        return False
    for name in sorted(layout, key=lambda n: (prod(layout[n][1]), n)):
        if first.content.digest(name) != second.content.digest(name):
            return False
    return True


def output_tensors(
    config: MergeConfiguration,
    models: list[ResolvedModel],
    merge_options: MergeOptions,
    vocabulary: VocabularyAlignment | None = None,
) -> list[OutputTensor]:
    """Every tensor of the output, in architecture order, checked across models.

    All missing tensors, shape mismatches and layer-count differences are
    collected and reported together, so one run shows everything to fix. With a
    tokenizer option (`vocabulary`), token-indexed tensors may differ along
    their token axis: mergekit aligns them to the output vocabulary.
    """
    try:
        architecture = get_architecture_info(config, merge_options)
    except Exception as error:  # mergekit raises bare RuntimeErrors here
        raise ModelError(
            f"cannot determine the models' architecture: {error}"
        ) from None
    problems: list[str] = []
    tensors: list[OutputTensor] = []
    for info, layer in _architecture_weights(architecture, config, models, problems):
        tensor = _check_tensor(info, layer, models, vocabulary, problems)
        if tensor is not None:
            tensors.append(tensor)
    if problems:
        raise ModelError("the models do not match:\n  " + "\n  ".join(problems))
    return tensors


def _architecture_weights(
    architecture: ModelArchitecture,
    config: MergeConfiguration,
    models: list[ResolvedModel],
    problems: list[str],
) -> list[tuple[WeightInfo, int | None]]:
    """(weight, layer index) pairs from mergekit's tables for the base config."""
    configs = [model.config for model in models]
    weights = []
    for module in architecture.modules.values():
        configured = ConfiguredModuleArchitecture(
            info=module.architecture,
            config=configs[0],
            weight_prefix=module.weight_prefix,
        )
        layer_counts = [module.architecture.num_layers(c) for c in configs]
        if len(set(layer_counts)) > 1:
            counts = ", ".join(f"{m.name}: {n}" for m, n in zip(models, layer_counts))
            problems.append(f"layer counts differ ({counts})")
        weights += [(w, None) for w in configured.pre_weights()]
        for layer in range(configured.num_layers()):
            weights += [(w, layer) for w in configured.layer_weights(layer)]
        weights += [(w, None) for w in configured.post_weights()]
    return weights


def _check_tensor(
    info: WeightInfo,
    layer: int | None,
    models: list[ResolvedModel],
    vocabulary: VocabularyAlignment | None,
    problems: list[str],
) -> OutputTensor | None:
    """Find one weight in every model; None for an optional weight nobody stores."""
    own_names = [info.name, *(info.aliases or ())]
    if info.optional and not any(n in m.headers for m in models for n in own_names):
        return None  # e.g. a tied lm_head: mergekit skips it too
    candidates = own_names + list(info.tied_names or ())
    stored = [next((n for n in candidates if n in m.headers), None) for m in models]
    lacking = [model for model, name in zip(models, stored) if name is None]
    if lacking and not (info.optional and stored[0] is not None):
        problems += [
            f"tensor {info.name}: missing from {m.name} ({m.path})" for m in lacking
        ]
        return None
    # An optional tensor only some models store (a buffer newer savers drop):
    # mergekit passes the method the copies that exist, and the base has one.
    headers = [m.headers[name] for m, name in zip(models, stored) if name is not None]
    shape = headers[0].shape
    axis = info.vocabulary_axis if vocabulary is not None else None
    if axis is not None:  # only the other axes must agree; mergekit aligns this one
        shape = (*shape[:axis], vocabulary.size, *shape[axis + 1 :])
    if len({_without(h.shape, axis) for h in headers}) > 1:
        listed = ", ".join(
            f"{m.name}: {list(h.shape)}" for m, h in zip(models, headers)
        )
        problem = f"tensor {info.name}: shapes differ ({listed})"
        if info.vocabulary_axis is not None and axis is None:
            problem += f": {FIX_HINT}"
        problems.append(problem)
        return None
    return OutputTensor(
        name=info.name,
        layer=layer,
        shape=shape,
        is_float=all(header.dtype in FLOAT_DTYPES for header in headers),
        stored_names=tuple(stored),
        aligned_axis=axis,
        base_only=bool(lacking),
        force_dtype=info.force_dtype,
    )


def _without(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    return shape if axis is None else shape[:axis] + shape[axis + 1 :]
