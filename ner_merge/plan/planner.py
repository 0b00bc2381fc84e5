"""The NER planner: score what the rules need, and decide every tensor's source.

`plan` composes the steps, each in a module of its own: the inventory of models
and output tensors (`ner_merge.models.inventory`), the NaN/Inf checks and scoring
(`ner_merge.scoring.streamed`), the selection rules (`ner_merge.plan.selection`, the
only home of the rules) and the stabilize stage (`ner_merge.plan.stabilized`); the
result is a source map.

Scores take one of two routes (`scoring_route`: by default exact on a CPU,
fast on a GPU). Exact: every copy in float64. Fast: copies in float32 with a
bound on their error (where float32 settles decisions: see
`_where_float32_settles`), then, for the decisions those bounds leave in doubt
(near ties), the copies that could win them in float64
(`selection.uncertain_copies`). Every choice is the one float64 scores alone
would make.
"""

from collections.abc import Callable
from dataclasses import replace

from mergekit.common import dtype_from_name
from mergekit.options import MergeOptions

from ner_merge.errors import ModelError
from ner_merge.models.cache_folder import default_cache_dir
from ner_merge.models.inventory import (
    OutputTensor,
    localized_config,
    output_tensors,
    resolve_models,
)
from ner_merge.models.names import tensor_type
from ner_merge.models.resolve import ResolvedModel
from ner_merge.models.vocabulary import vocabulary_alignment
from ner_merge.plan.selection import (
    Selection,
    SelectionError,
    TensorSpec,
    choose,
    group_tensors,
    uncertain_copies,
)
from ner_merge.plan.source_map import ModelEntry, SourceMap, lora_source
from ner_merge.plan.stabilized import stabilized
from ner_merge.recipe.recipe import Recipe
from ner_merge.scoring.cache import ScoreCache
from ner_merge.scoring.ner import BoundedScore
from ner_merge.scoring.streamed import (
    NERD_SCORING,
    SPEC_SCORING,
    CopyReader,
    Place,
    Precision,
    Scoring,
    check_device,
    check_finite,
    every_copy,
    nonfinite_copies,
    score_matrices,
    scoring_progress,
    scoring_route,
)
from ner_merge.scoring.workers import Workers, choose_workers


def tensor_specs(tensors: list[OutputTensor], scoring: Scoring) -> list[TensorSpec]:
    """The output tensors as selection sees them, under this scoring mode."""
    return [
        TensorSpec(
            name=tensor.name,
            layer=tensor.layer,
            shape=tensor.shape,
            scored=scoring.selects(tensor),
            floating=tensor.is_float,
            base_only=tensor.base_only,
        )
        for tensor in tensors
    ]


def plan(
    recipe: Recipe,
    merge_options: MergeOptions | None = None,
    quiet: bool = False,
    models: list[ResolvedModel] | None = None,
    workers: Workers | None = None,
) -> SourceMap:
    """Score the recipe's models and return the source map of the merge.

    `workers` default to $NER_MERGE_RAY or $NER_MERGE_WORKERS, else local
    workers as many as the cores and memory allow (`ner_merge.scoring.workers`).
    """
    workers = workers or choose_workers()
    merge_options = merge_options or MergeOptions()
    check_device(merge_options)
    models = models or resolve_models(recipe, merge_options)
    config = localized_config(recipe, models)
    vocabulary = vocabulary_alignment(config, merge_options)
    tensors = output_tensors(config, models, merge_options, vocabulary)
    names = [model.name for model in models]
    selection = Selection.from_options(recipe.options, recipe.exclusions)
    selection.check_patterns([t.name for t in tensors], names, recipe.where)
    scoring = NERD_SCORING if recipe.options.compat == "nerd" else SPEC_SCORING
    grouping = group_tensors(tensor_specs(tensors, scoring), selection, len(names))
    scored = {spec.name for spec in grouping.to_score()}
    to_score = [tensor for tensor in tensors if tensor.name in scored]
    # NaN or Inf in a tensor no rule scores (a norm, a bias) is found before any
    # scoring; in a scored copy, as it is scored.
    unscored = [tensor for tensor in tensors if tensor.name not in scored]
    if recipe.options.nonfinite == "error":
        check_finite(nonfinite_copies(unscored, models), tensors, names)
    reader = CopyReader(models, vocabulary)
    cache_dir = default_cache_dir()
    device = merge_options.device
    cache = ScoreCache(cache_dir, scoring.cache_options(device)) if cache_dir else None
    route = scoring_route(recipe.options, device)
    quiet = quiet or merge_options.quiet
    progress = scoring_progress(len(to_score) * len(models), quiet)

    def score(wanted: dict[Place, Precision]) -> dict[Place, BoundedScore | None]:
        return score_matrices(
            to_score,
            models,
            reader,
            wanted,
            scoring,
            recipe.options.nonfinite,
            quiet=quiet,
            cache=cache,
            device=device,
            workers=workers,
            progress=progress,
        )

    with progress:
        if route.scoring == "fast":
            specs = tensor_specs(tensors, scoring)
            found = _where_float32_settles(score, specs, to_score, models, reader)
        else:
            found = score(every_copy(to_score, len(models), "exact"))
        nonfinite = nonfinite_copies(tensors, models)
        scores, bounds = _by_tensor(found, to_score, len(models))
        contents = _contents(to_score, models, reader)
        refine = uncertain_copies(grouping, scores, bounds, nonfinite, contents)
        if refine:  # near ties: the copies that may win them, scored exactly
            found |= score(dict.fromkeys(sorted(refine), "exact"))
            scores, bounds = _by_tensor(found, to_score, len(models))
    refined = {name for name, _ in refine}
    try:
        choices = choose(grouping, scores, names, nonfinite, None, bounds, refined)
    except SelectionError as error:
        raise ModelError(str(error)) from None
    if recipe.options.stabilizes:
        dtype = dtype_from_name(config.dtype) if config.dtype else None
        choices = stabilized(tensors, choices, reader, names, dtype)
    return SourceMap(
        models=tuple(
            ModelEntry(
                name=model.name,
                path=model.path,
                revision=model.revision,
                fingerprint=model.content.fingerprint,
                role="base" if index == 0 else "fine-tuned",
                exclude=recipe.exclusions[index] if recipe.exclusions else (),
                lora=lora_source(model),
            )
            for index, model in enumerate(models)
        ),
        options=recipe.options.planned(),
        route=route,
        tensors=choices,
    )


def _where_float32_settles(
    score: Callable[[dict[Place, Precision]], dict[Place, BoundedScore | None]],
    specs: list[TensorSpec],
    tensors: list[OutputTensor],
    models: list[ResolvedModel],
    reader: CopyReader,
) -> dict[Place, BoundedScore | None]:
    """Every copy's score: fast for the tensor types whose decisions float32
    settles, exact for the others.

    A near tie costs its float32 scores and then float64 ones, more than float64
    alone, and fine-tunes close to their base make near ties of most decisions
    on a tensor type (`mlp.up_proj.weight` at every depth). Which types float32
    settles is seen in one decoder layer, the middle one (the first and last are
    often unlike the rest): it and everything outside the layers are scored
    fast, and each tensor there is judged as if it chose alone among all the
    models. In the other layers, a type float32 settled there is scored fast,
    any other exact. What is scored how depends on the models' scores alone, not
    on the workers nor on the recipe's other options, so recipes of the same
    models share their scores through the cache (`ner-merge compare`).
    """
    count = len(models)
    layers = sorted({tensor.layer for tensor in tensors if tensor.layer is not None})
    probe = {None, layers[len(layers) // 2]} if layers else {None}
    seen = [tensor for tensor in tensors if tensor.layer in probe]
    found = score(every_copy(seen, count, "fast"))
    scores, bounds = _by_tensor(found, seen, count)
    alone = group_tensors(specs, Selection(), count)  # each scored tensor alone
    judged = [g for g in alone.groups if g.scored[0].name in scores]
    contents = _contents(seen, models, reader)
    doubtful = uncertain_copies(
        replace(alone, groups=tuple(judged)), scores, bounds, None, contents
    )
    settled = {
        tensor_type(name, layer)
        for name, layer in ((t.name, t.layer) for t in seen)
        if any(bounds[name]) and not any((name, i) in doubtful for i in range(count))
    }
    rest = {
        (t.name, index): "fast" if tensor_type(t.name, t.layer) in settled else "exact"
        for t in tensors
        if t.layer not in probe
        for index in range(count)
    }
    return found | (score(rest) if rest else {})


def _by_tensor(
    found: dict[Place, BoundedScore | None], tensors: list[OutputTensor], count: int
) -> tuple[dict[str, list[float | None]], dict[str, list[float]]]:
    """Scores and their bounds, per tensor and candidate, as selection takes them."""
    scores, bounds = {}, {}
    for tensor in tensors:
        copies = [found[tensor.name, index] for index in range(count)]
        scores[tensor.name] = [c.value if c else None for c in copies]
        bounds[tensor.name] = [c.bound if c else 0.0 for c in copies]
    return scores, bounds


def _contents(
    tensors: list[OutputTensor], models: list[ResolvedModel], reader: CopyReader
) -> dict[str, list[str | None]]:
    """Each scored copy's content hash, where its bytes are what was scored (an
    aligned copy depends on every model's vocabulary: no hash)."""
    contents = {}
    for tensor in tensors:
        if reader.is_aligned(tensor):
            continue
        digests = [
            model.content.known(stored)
            for model, stored in zip(models, tensor.stored_names)
        ]
        contents[tensor.name] = [d.hash if d else None for d in digests]
    return contents
