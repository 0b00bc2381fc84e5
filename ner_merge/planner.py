"""The NER planner: score every weight matrix of every model, pick each tensor's source.

Reading is streamed: one tensor of one model at a time, from memory-mapped
safetensors shards, so planning a 7B trio holds a few matrices, never a model.

The rules are in RULES below, in one place, and the report quotes them.
Tensor names come from mergekit's architecture tables: no family is hard-coded.
"""

import logging
from collections import Counter
from dataclasses import dataclass

import tqdm
from mergekit.architecture import ModelArchitecture, get_architecture_info
from mergekit.architecture.base import ConfiguredModuleArchitecture, WeightInfo
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader
from mergekit.options import MergeOptions

from ner_merge.errors import ModelError
from ner_merge.models import ResolvedModel, resolve_model
from ner_merge.ner import NonFiniteMatrixError, normalized_effective_rank
from ner_merge.recipe import Recipe
from ner_merge.source_map import ModelEntry, SourceMap, TensorChoice

LOG = logging.getLogger(__name__)

RULES = """\
- a 2-D floating-point weight is a *matrix*: it goes to the model whose copy has
  the highest NER; on equal scores the earlier candidate wins (base first, then
  the fine-tuned models in recipe order);
- a tensor of any other shape that shares its module with a matrix (`X.bias`
  beside a 2-D `X.weight`) follows that matrix, so a projection stays whole;
- any other floating-point tensor (a norm's scale) follows its decoder layer: it
  comes from the model that supplies most of that layer's matrix parameters
  (outside the layers: most of the matrices outside the layers), ties again by
  candidate order, because a norm rescales the inputs of the matrices around it;
- non-floating-point tensors (integer buffers) come from the base.
"""

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model, and what each candidate stores for it."""

    name: str
    layer: int | None
    shape: tuple[int, ...]
    is_float: bool
    stored_names: tuple[str, ...]  # per candidate: the name in its files (aliases)

    @property
    def is_matrix(self) -> bool:
        return self.is_float and len(self.shape) == 2

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def localized_config(recipe: Recipe, models: list[ResolvedModel]) -> MergeConfiguration:
    """The recipe's configuration with every model replaced by its local folder.

    mergekit then reads exactly the files that were planned (the resolved Hub
    commit, not whatever is newest) and never asks the Hub again.
    """
    local = {
        ref: ModelReference.parse(m.path) for ref, m in zip(recipe.candidates(), models)
    }
    return recipe.config.model_copy(
        update={
            "base_model": local[recipe.config.base_model],
            "models": [
                model.model_copy(update={"model": local[model.model]})
                for model in recipe.config.models or []
            ],
        }
    )


def resolve_models(recipe: Recipe) -> list[ResolvedModel]:
    """Resolve every candidate, and read each one's index and headers up front."""
    models = [resolve_model(reference) for reference in recipe.candidates()]
    for model in models:  # fail now, naming the model, not mid-plan
        model.headers  # noqa: B018
        model.config  # noqa: B018
    return models


def output_tensors(
    config: MergeConfiguration, models: list[ResolvedModel], merge_options: MergeOptions
) -> list[OutputTensor]:
    """Every tensor of the output, in architecture order, checked across models.

    All missing tensors, shape mismatches and layer-count differences are
    collected and reported together, so one run shows everything to fix.
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
        tensor = _check_tensor(info, layer, models, problems)
        if tensor is not None:
            tensors.append(tensor)
    if problems:
        raise ModelError("the models do not match:\n  " + "\n  ".join(problems))
    LOG.debug("%d output tensors", len(tensors))
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
    problems: list[str],
) -> OutputTensor | None:
    """Find one weight in every model; None for an optional weight nobody stores."""
    own_names = [info.name, *(info.aliases or ())]
    if info.optional and not any(n in m.headers for m in models for n in own_names):
        return None  # e.g. a tied lm_head: mergekit skips it too
    candidates = own_names + list(info.tied_names or ())
    stored, headers = [], []
    for model in models:
        name = next((n for n in candidates if n in model.headers), None)
        if name is None:
            problems.append(
                f"tensor {info.name}: missing from {model.name} ({model.path})"
            )
            continue
        stored.append(name)
        headers.append(model.headers[name])
    if len(stored) < len(models):
        return None
    shapes = {header.shape for header in headers}
    if len(shapes) > 1:
        listed = ", ".join(
            f"{m.name}: {list(h.shape)}" for m, h in zip(models, headers)
        )
        hint = ""
        if info.vocabulary_axis is not None:
            hint = (
                " (vocabulary sizes differ: ner-merge needs models with one vocabulary)"
            )
        problems.append(f"tensor {info.name}: shapes differ ({listed}){hint}")
        return None
    return OutputTensor(
        name=info.name,
        layer=layer,
        shape=headers[0].shape,
        is_float=all(header.dtype in FLOAT_DTYPES for header in headers),
        stored_names=tuple(stored),
    )


def score_matrices(
    tensors: list[OutputTensor],
    models: list[ResolvedModel],
    nonfinite: str = "error",
    quiet: bool = False,
) -> dict[str, list[float | None]]:
    """NER of every model's copy of every matrix, streamed one tensor at a time.

    A copy holding NaN or Inf stops the plan, naming model and tensor, unless
    `nonfinite` is "lose": then its score is None, which loses to any number.
    """
    loaders = [LazyTensorLoader(model.index, lazy_unpickle=False) for model in models]
    matrices = [t for t in tensors if t.is_matrix]
    scores: dict[str, list[float | None]] = {}
    progress = tqdm.tqdm(
        total=len(matrices) * len(models),
        desc="NER scoring",
        unit="matrix",
        disable=quiet,
    )
    with progress:
        for tensor in matrices:
            row = []
            for model, loader, stored in zip(models, loaders, tensor.stored_names):
                matrix = loader.get_tensor(stored)
                try:
                    row.append(normalized_effective_rank(matrix))
                except NonFiniteMatrixError:
                    where = f"model {model.name}: tensor {stored} holds NaN or Inf"
                    if nonfinite != "lose":
                        raise ModelError(
                            f"{where} values (set `nonfinite: lose` to let such "
                            "copies lose instead)"
                        ) from None
                    LOG.warning("%s; it loses this tensor", where)
                    row.append(None)
                del matrix
                progress.update()
            scores[tensor.name] = row
    for loader in loaders:
        loader.flush()
    return scores


def first_best(values: list[float | None]) -> int | None:
    """Index of the largest value, the earliest on ties (the tie rule).

    None (a copy that could not be scored) loses to any number; None if all are.
    """
    best = None
    for index, value in enumerate(values):
        if value is not None and (best is None or value > values[best]):
            best = index
    return best


def choose_sources(
    tensors: list[OutputTensor],
    scores: dict[str, list[float | None]],
    names: list[str],
) -> dict[str, TensorChoice]:
    """Apply the rules in this module's docstring to scored matrices."""
    choices: dict[str, TensorChoice] = {}
    supplied: dict[int | None, Counter] = {}  # layer -> model index -> parameters
    for tensor in tensors:
        if tensor.is_matrix:
            winner = first_best(scores[tensor.name])
            if winner is None:
                raise ModelError(
                    f"tensor {tensor.name}: every model's copy is not finite"
                )
            choices[tensor.name] = TensorChoice(
                source=names[winner],
                rule="highest-ner",
                layer=tensor.layer,
                shape=tensor.shape,
                scores=dict(zip(names, scores[tensor.name])),
            )
            parameters = tensor.shape[0] * tensor.shape[1]
            supplied.setdefault(tensor.layer, Counter())[winner] += parameters
    matrix_modules = {t.module: t.name for t in tensors if t.is_matrix}
    for tensor in tensors:
        if tensor.is_matrix:
            continue
        common = dict(layer=tensor.layer, shape=tensor.shape)
        if not tensor.is_float:
            choices[tensor.name] = TensorChoice(source=names[0], rule="base", **common)
        elif tensor.module in matrix_modules:
            matrix = matrix_modules[tensor.module]
            source = choices[matrix].source
            choices[tensor.name] = TensorChoice(
                source=source, rule="follows", follows=matrix, **common
            )
        else:
            counts = supplied.get(tensor.layer, Counter())
            winner = first_best([counts[i] for i in range(len(names))])
            group = (
                "non-layer matrices"
                if tensor.layer is None
                else f"layer {tensor.layer}"
            )
            choices[tensor.name] = TensorChoice(
                source=names[winner], rule="follows", follows=group, **common
            )
    return {tensor.name: choices[tensor.name] for tensor in tensors}


def plan(
    recipe: Recipe,
    merge_options: MergeOptions | None = None,
    quiet: bool = False,
    models: list[ResolvedModel] | None = None,
) -> SourceMap:
    """Score the recipe's models and return the source map of the merge."""
    merge_options = merge_options or MergeOptions()
    models = models or resolve_models(recipe)
    config = localized_config(recipe, models)
    tensors = output_tensors(config, models, merge_options)
    quiet = quiet or merge_options.quiet
    scores = score_matrices(tensors, models, recipe.options.nonfinite, quiet=quiet)
    names = [model.name for model in models]
    return SourceMap(
        models=tuple(
            ModelEntry(
                name=model.name,
                path=model.path,
                revision=model.revision,
                fingerprint=model.fingerprint,
                role="base" if index == 0 else "fine-tuned",
            )
            for index, model in enumerate(models)
        ),
        options=recipe.options.model_dump(exclude={"source_map"}),
        tensors=choose_sources(tensors, scores, names),
    )
