"""An NER merge from recipe to finished folder: plan, stitch, report, publish.

`with_ner_planning` wraps mergekit's `run_merge` (see `ner_merge.hook`): recipes
with another merge method pass straight through; an NER recipe is validated,
planned (or its given source map checked), merged by mergekit into a hidden
staging folder beside OUT, completed with the source map and report, and only
then renamed to OUT (see `ner_merge.host.output` for what is never done to OUT).
"""

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import click
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from ner_merge.errors import NerMergeError, SourceMapError
from ner_merge.host.interrupt import (
    INTERRUPTED,
    end_on_interrupt,
    interrupted,
    publishing,
)
from ner_merge.host.output import OutputFolder
from ner_merge.host.quiet import mergekit_notices_hidden
from ner_merge.host.space import merge_bytes
from ner_merge.models.folders import check_base_tokenizer
from ner_merge.models.inventory import (
    OutputTensor,
    localized_config,
    output_tensors,
    resolve_models,
)
from ner_merge.models.lora import lora_merge_cache
from ner_merge.models.resolve import ResolvedModel
from ner_merge.models.vocabulary import vocabulary_alignment
from ner_merge.plan.planner import plan, tensor_specs
from ner_merge.plan.selection import Selection, SelectionError, group_tensors, reconcile
from ner_merge.plan.source_map import SOURCE_MAP_FILE, SourceMap, lora_source
from ner_merge.plan.stabilized import stabilized
from ner_merge.recipe.recipe import METHOD_NAME, Recipe, misspelt_method
from ner_merge.report.card import write_model_card
from ner_merge.report.markdown import (
    FIGURE_FILE,
    REPORT_FILE,
    decision_counts,
    write_report,
)
from ner_merge.scoring.streamed import (
    NERD_SCORING,
    SPEC_SCORING,
    CopyReader,
    check_device,
    nonfinite_copies,
)
from ner_merge.scoring.workers import choose_workers

LOG = logging.getLogger(__name__)

MAX_NAMED = 5  # tensors named in one refusal

# Smallest output shard an NER merge picks by itself (bytes): tiny models still
# come out as one file.
SMALLEST_DEFAULT_SHARD = 256 << 20

# A merge's steps ("plan", then "merge"), each run inside step(name): a caller
# that reports progress times them (`ner-merge compare`).
Step = Callable[[str], AbstractContextManager]


def _untimed(_: str) -> AbstractContextManager:
    return nullcontext()


def with_ner_planning(run_merge: Callable) -> Callable:
    """mergekit's `run_merge`, extended to plan and publish NER merges."""

    @functools.wraps(run_merge)
    def run_merge_with_ner(
        merge_config: MergeConfiguration,
        out_path: str,
        options: MergeOptions,
        config_source: str | None = None,
    ):
        context = click.get_current_context(silent=True)
        where = (context.params.get("config_file") if context else None) or "recipe"
        if merge_config.merge_method != METHOD_NAME:
            slip = misspelt_method(merge_config.merge_method, where)
            if slip and context is not None:
                raise click.ClickException(slip)
            return run_merge(
                merge_config, out_path, options, config_source=config_source
            )
        try:
            recipe = Recipe.from_config(merge_config, where=where, source=config_source)
            source_map = merge(recipe, out_path, options, config_source, run_merge)
        except NerMergeError as error:
            if context is None:
                raise
            raise click.ClickException(str(error)) from error
        except KeyboardInterrupt as interrupt:
            if context is None:
                raise
            if interrupted("mergekit-yaml", interrupt):
                raise SystemExit(INTERRUPTED) from None
            source_map = SourceMap.load(Path(out_path) / SOURCE_MAP_FILE)
        click.echo(merged_summary(out_path, source_map))
        end_on_interrupt(0, f"mergekit-yaml: {out_path} is complete")
        return source_map

    return run_merge_with_ner


def merged_summary(out_path: str, source_map: SourceMap) -> str:
    """The last lines of a merge: where its map, report and figure are, and how
    many decisions the map holds."""
    folder = Path(out_path)
    decisions, refined = decision_counts(source_map)
    lines = [
        f"NER merge written to {out_path}: {len(source_map.tensors)} tensors, "
        f"{decisions} decisions ({refined} near ties refined in float64)",
        f"  report: {folder / REPORT_FILE}",
    ]
    if (folder / FIGURE_FILE).exists():  # not without the `report` extra
        lines.append(f"  figure: {folder / FIGURE_FILE}")
    lines.append(f"  map:    {folder / SOURCE_MAP_FILE}")
    return "\n".join(lines)


def merge(
    recipe: Recipe,
    out_path: str,
    merge_options: MergeOptions,
    config_source: str | None,
    run_merge: Callable,
    step: Step = _untimed,
) -> SourceMap:
    """Plan (or check the given map), run mergekit's merge, publish OUT atomically.

    run_merge: mergekit's own, not the hook's wrap of it (which calls this).
    """
    check_device(merge_options)
    # $NER_MERGE_WORKERS or $NER_MERGE_RAY, checked before any model is read
    workers = None if recipe.options.source_map else choose_workers()
    models = resolve_models(recipe, merge_options)
    check_base_tokenizer(recipe, models[0].path, merge_options)
    output = OutputFolder(out_path, [model.path for model in models])
    config = localized_config(recipe, models)
    needed = merge_bytes(config, models, merge_options)
    with publishing(out_path) as published_if, output.prepared(needed):
        with step("plan"):
            if recipe.options.source_map:
                source_map = checked_source_map(recipe, models, merge_options)
            else:
                source_map = plan(recipe, merge_options, models=models, workers=workers)
        config_source = config_source or recipe.config.to_yaml()
        with step("merge"), output.staged() as staging:
            published_if(staging)
            map_path = staging / SOURCE_MAP_FILE
            source_map.save(map_path)
            parameters = dict(config.parameters or {}, source_map=str(map_path))
            try:
                with mergekit_notices_hidden():
                    run_merge(
                        config.model_copy(update={"parameters": parameters}),
                        str(staging),
                        streaming_options(merge_options, models),
                        config_source=config_source,
                    )
            except SourceMapError as error:  # from the method, naming the staged copy
                raise as_given(error, map_path, recipe.options.source_map) from None
            if merge_options.write_model_card:
                write_model_card(staging, recipe.config, config_source)
            write_report(staging, source_map, recipe)
    return source_map


def streaming_options(
    options: MergeOptions, models: list[ResolvedModel]
) -> MergeOptions:
    """mergekit's options for the merge itself: our model card replaces its own,
    unless the user chose a shard size, shards hold about one largest tensor,
    `pytorch_model.bin` inputs are read lazily, and LoRA fine-tunes have the
    `lora_merge_cache` the plan merged them in (`ner_merge.models.lora`).

    mergekit's writer keeps a whole output shard in memory, 5 GB by default: all
    of a 0.5B model, a third of a 7B one. With shards the size of the largest
    tensor (at least SMALLEST_DEFAULT_SHARD), a merge holds O(largest tensor)
    whatever the model's size, at the price of more, smaller shard files.
    Without `lazy_unpickle`, mergekit loads a `.bin` whole, and, as the method
    closes its inputs after each tensor, again for every tensor.
    """
    updates: dict = {"write_model_card": False}
    lora = [model.name for model in models if model.adapter is not None]
    if lora and not options.lora_merge_cache:  # where the plan merged them
        updates["lora_merge_cache"] = str(lora_merge_cache(options, lora[0]))
    if not all(model.index.is_safetensors for model in models):
        updates["lazy_unpickle"] = True
    if options.out_shard_size == MergeOptions.model_fields["out_shard_size"].default:
        largest = max(
            header.end - header.start
            for model in models
            for header in model.headers.values()
        )
        updates["out_shard_size"] = max(largest, SMALLEST_DEFAULT_SHARD)
    return options.model_copy(update=updates)


def as_given(error: SourceMapError, staged: Path, given: str | None) -> SourceMapError:
    """The merge method names the map it reads: a staging copy, gone with the
    failed merge. A user who gave a map can only fix that file, so name it."""
    return SourceMapError(str(error).replace(str(staged), given)) if given else error


def checked_source_map(
    recipe: Recipe, models: list[ResolvedModel], merge_options: MergeOptions
) -> SourceMap:
    """Load a user-given map and prove it was made for exactly these models (by
    content) and the recipe's options; its hand edits are reconciled with the
    rules (`selection.reconcile`), and the stabilize shares of tensors whose
    source changed are computed anew.

    The map names the models; which they are and where their files are comes
    from the recipe: the map returned carries the recipe's names and paths, so
    no tensor is read from a folder the map alone points to.
    """
    where = recipe.options.source_map
    try:
        loaded = SourceMap.load(where)
    except SourceMapError as error:  # name the recipe and option that gave it
        option = f"{recipe.where}: parameters.source_map"
        raise SourceMapError(f"{option}: {error}") from None
    source_map = paired_with_recipe(loaded, models, where)
    _check_options(recipe, source_map, where)
    config = localized_config(recipe, models)
    vocabulary = vocabulary_alignment(config, merge_options)
    tensors = output_tensors(config, models, merge_options, vocabulary)
    wanted = {tensor.name for tensor in tensors}
    missing, unknown = (
        wanted - set(source_map.tensors),
        set(source_map.tensors) - wanted,
    )
    if missing or unknown:
        raise SourceMapError(
            f"{where}: tensors do not match the models: "
            f"missing {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unknown {sorted(unknown)[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    names = [model.name for model in models]
    scoring = (
        NERD_SCORING if source_map.options.get("compat") == "nerd" else SPEC_SCORING
    )
    grouping = group_tensors(
        tensor_specs(tensors, scoring),
        Selection.of_map(source_map, where),
        len(names),
    )
    try:
        source_map = reconcile(source_map, grouping, nonfinite_copies(tensors, models))
    except SelectionError as error:
        raise SourceMapError(f"{where}: {error}") from None
    if source_map.options.get("stabilize"):
        dtype = dtype_from_name(config.dtype) if config.dtype else None
        reader = CopyReader(models, vocabulary)
        choices = stabilized(tensors, source_map.tensors, reader, names, dtype)
        source_map = source_map.model_copy(update={"tensors": choices})
    _check_sources_finite(source_map, tensors, models, where)
    return source_map


def paired_with_recipe(
    source_map: SourceMap, models: list[ResolvedModel], where: str
) -> SourceMap:
    """The map's models paired with the recipe's by content, then renamed and
    ordered as the recipe has them.

    A map made in another folder, or with other spellings of the same models
    (`x/sea` for `./x/sea`, a link, a copy), is as valid as the original: each
    recipe model takes the entry with its content fingerprint, in the same role
    (the base is the base). Every mention of a model (sources, scores, units,
    exclusions) is renamed, and recipe order becomes the map's order: the tie
    order, so a tie the map broke otherwise reads as an `override`.
    """
    names = [entry.name for entry in source_map.models]
    if len(names) != len(models):
        raise SourceMapError(
            f"{where}: made for models {names}, but the recipe has "
            f"{[model.name for model in models]}"
        )
    by_content = {entry.fingerprint: entry for entry in source_map.models}
    renames: dict[str, str] = {}
    located = []
    for index, model in enumerate(models):
        entry = by_content.get(model.content.fingerprint)
        if entry is None:
            raise SourceMapError(_unmapped(source_map, model, where))
        role = "base" if index == 0 else "fine-tuned"
        if entry.role != role:
            raise SourceMapError(
                f"{where}: model {model.name} is {role} in the recipe, but the map "
                f"has its content ({entry.name}) as {entry.role}; plan again"
            )
        renames[entry.name] = model.name
        located.append(
            entry.model_copy(
                update={
                    "name": model.name,
                    "path": model.path,
                    "revision": model.revision,
                    "lora": lora_source(model),
                }
            )
        )
    renamed = source_map.renamed(renames)
    return renamed.model_copy(update={"models": tuple(located)})


def _unmapped(source_map: SourceMap, model: ResolvedModel, where: str) -> str:
    """Why a recipe model has no entry in the map: changed since, or another."""
    fingerprint = model.content.fingerprint
    for entry in source_map.models:
        if entry.name == model.name:
            return (
                f"{where}: model {model.name} has changed since the map was made "
                f"(fingerprint {entry.fingerprint[:12]} in the map, "
                f"{fingerprint[:12]} on disk): plan again"
            )
    listed = ", ".join(
        f"{entry.name} ({entry.fingerprint[:12]})" for entry in source_map.models
    )
    return (
        f"{where}: made for models {listed}; none holds the content of model "
        f"{model.name} ({fingerprint[:12]}): plan again"
    )


def _check_options(recipe: Recipe, source_map: SourceMap, where: str) -> None:
    """Refuse a recipe option set to something other than what the map was
    planned with, naming every one: the map's choices would silently ignore it.
    Options the recipe leaves out are the map's. `scoring` is not compared: it
    says how scores are computed, and every route makes float64's choices, so a
    map planned with one serves a recipe that names another."""
    chosen = recipe.options.model_dump()
    differ = [
        f"{key}: {chosen[key]!r} in the recipe, "
        f"{source_map.options.get(key, '(not set)')!r} in the map"
        for key in sorted(recipe.options.model_fields_set - {"source_map", "scoring"})
        if source_map.options.get(key) != chosen[key]
    ]
    differ += [
        f"exclude of model {entry.name}: {','.join(patterns)!r} in the recipe, "
        f"{','.join(entry.exclude)!r} in the map"
        for entry, patterns in zip(source_map.models, recipe.exclusions)
        if patterns and tuple(patterns) != entry.exclude
    ]
    if differ:
        raise SourceMapError(
            f"{where}: the recipe sets options the map was not planned with ("
            + "; ".join(differ)
            + "): plan again with them, or remove them from the recipe"
        )


def _check_sources_finite(
    source_map: SourceMap,
    tensors: list[OutputTensor],
    models: list[ResolvedModel],
    where: str,
) -> None:
    """Refuse a map that would copy NaN or Inf into the output (a hand edit may
    pick such a copy; a stabilized tensor reads the base's copy too)."""
    index = {model.name: i for i, model in enumerate(models)}
    problems = []
    for tensor in tensors:
        choice = source_map.tensors[tensor.name]
        if not tensor.is_float:
            continue
        used = {choice.source} | ({models[0].name} if choice.stabilized else set())
        for name in sorted(used):
            stored = tensor.stored_names[index[name]]
            if stored is not None and not models[index[name]].content.finite(stored):
                problems.append(f"{tensor.name} from {name}")
    if problems:
        raise SourceMapError(
            f"{where}: the map takes copies holding NaN or Inf: "
            + ", ".join(problems[:MAX_NAMED])
            + (" ..." if len(problems) > MAX_NAMED else "")
        )
