"""`ner-merge compare`: which recipe wins on these models, on these texts?

Each recipe (NER recipes of the same models, differing in options such as
`granularity` or `stabilize`) is merged into DIR/NAME, NAME being its file name
without the suffix; with `linear`, mergekit's plain average of the same models
goes into DIR/linear. Then every input model and every merge is scored on every
text by `ner_merge.evaluate.perplexity` (what `ner-merge eval` runs), and the table is
returned and written as DIR/compare.md, DIR/compare.json and DIR/compare.png.

Everything that can be refused is refused before any model is scored or merged,
in one line naming the file or option: a recipe's own problems, recipes of other
models, two recipes of one NAME, a text that cannot be scored, and a DIR that
must not be replaced or whose disk has no room for every merge. DIR follows
the rules of a merge's OUT (`ner_merge.host.output`): staged beside itself, published
whole with a manifest, and replaced only when a comparison wrote it.

The first recipe pays for scoring every model; the scores go to the score cache
(`ner_merge.scoring.cache`), so each later recipe costs stitching and evaluation only.
compare.json holds no timings: the same inputs give the same bytes.
"""

import inspect
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click
import mergekit.merge
from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.options import MergeOptions

from ner_merge.errors import CompareError
from ner_merge.evaluate.perplexity import (
    PerplexityTable,
    check_model_folders,
    evaluate,
    evaluation_device,
    read_texts,
)
from ner_merge.evaluate.words import plural
from ner_merge.host import pipeline
from ner_merge.host.interrupt import publishing
from ner_merge.host.method import register
from ner_merge.host.output import OutputFolder
from ner_merge.host.quiet import mergekit_notices_hidden
from ner_merge.host.space import merge_bytes
from ner_merge.models.inventory import resolve_models, with_local_models
from ner_merge.models.resolve import ResolvedModel
from ner_merge.recipe.recipe import Recipe, candidate_models
from ner_merge.report.card import write_model_card
from ner_merge.scoring.streamed import check_device

LOG = logging.getLogger(__name__)

LINEAR = "linear"  # the plain average's row and folder
TABLE_FILE, DATA_FILE, FIGURE_FILE = "compare.md", "compare.json", "compare.png"


@dataclass(frozen=True)
class Merge:
    """One merge of the comparison: a recipe's, or the plain average."""

    name: str  # its folder in DIR
    label: str  # its row: the recipe's file name, or "linear"
    config: MergeConfiguration
    source: str  # the recipe's text, copied into the merge's model card
    recipe: Recipe | None = None  # None for the plain average
    recipe_file: str | None = None


class Progress:
    """A line per step on stderr: its number, kind and subject as it starts,
    its seconds when it ends. By default the time ends the same line; verbose,
    the steps' own output comes between, so the time gets a line of its own;
    quiet, no line at all."""

    def __init__(self, steps: int, verbose: bool, quiet: bool = False) -> None:
        self.steps, self.verbose, self.quiet, self.done = steps, verbose, quiet, 0

    @contextmanager
    def step(self, kind: str, subject: str) -> Iterator[None]:
        self.done += 1
        if self.quiet:
            yield
            return
        line = f"[{self.done}/{self.steps}] {kind:<5} {subject}"
        click.echo(line + ("" if self.verbose else " ..."), nl=self.verbose, err=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.verbose:
                click.echo(err=True)  # the error on a line of its own
            raise
        seconds = f"{time.perf_counter() - start:.1f} s"
        click.echo(f"{line}: {seconds}" if self.verbose else f" {seconds}", err=True)


def compare(
    recipe_files: Sequence[str],
    texts: Sequence[str],
    out_dir: str,
    linear: bool = False,
    verbose: bool = False,
    quiet: bool = False,
    device: str | None = None,
) -> PerplexityTable:
    """Merge each recipe (and the plain average, if `linear`) into `out_dir`,
    score the inputs and merges on `texts`, write the table; returns it.
    `verbose`: mergekit's and the planner's progress bars too; `quiet`: no line
    per step. `device`: where to merge and score (as mergekit's --device);
    by default merges run on the CPU and scoring on CUDA when available, as
    `ner-merge eval`'s."""
    started = time.perf_counter()
    merges = _recipe_merges(recipe_files, linear)
    models = _same_models([merge.recipe for merge in merges])
    if linear:
        average = plain_average(merges[0].config)
        merges.append(Merge(LINEAR, LINEAR, average, average.to_yaml()))
    inputs = [model.path for model in models]
    check_model_folders(inputs)
    read_texts(texts, inputs)
    options = MergeOptions(quiet=not verbose, device=device)
    check_device(options)  # before any work: the merges run there
    device = evaluation_device(device)
    labels = [model.name for model in models] + [merge.label for merge in merges]
    merge_steps = sum(2 if merge.recipe else 1 for merge in merges)
    progress = Progress(merge_steps + len(labels), verbose, quiet)
    output = OutputFolder(out_dir, inputs, role="-o")
    needed = sum(
        merge_bytes(
            with_local_models(merge.config, models), models, options, bool(merge.recipe)
        )
        for merge in merges
    )
    with (
        publishing(out_dir) as published_if,
        output.prepared(needed),
        output.staged() as staging,
    ):
        published_if(staging)
        for merge in merges:
            _merge(merge, staging / merge.name, models, options, progress)
        folders = inputs + [str(staging / merge.name) for merge in merges]
        scored = []
        for label, folder in zip(labels, folders):
            with progress.step("eval", label):
                scored.append(evaluate([folder], texts, device))
        table = PerplexityTable(
            models=tuple(labels),
            texts=scored[0].texts,
            values=tuple(row.values[0] for row in scored),
            device=device,
        )
        _write_table(staging, table, len(models), merges, texts)
    click.echo(
        f"compare: {plural(len(merges), 'merge')}, {plural(len(labels), 'model')} "
        f"x {plural(len(texts), 'text')} "
        f"in {time.perf_counter() - started:.1f} s; table in "
        f"{os.path.join(out_dir, TABLE_FILE)}",
        err=True,
    )
    return table


def _recipe_merges(recipe_files: Sequence[str], linear: bool) -> list[Merge]:
    """Each recipe, validated, with the folder its merge goes to; two merges
    may not share a folder."""
    taken = {LINEAR: "--linear"} if linear else {}
    merges = []
    for path in recipe_files:
        name = Path(path).stem
        if name in taken:
            raise CompareError(
                f"{path}: its merge would go to DIR/{name}, as {taken[name]}'s "
                "would; give each recipe a file name of its own"
            )
        taken[name] = path
        recipe = Recipe.from_file(path)
        source = Path(path).read_text(encoding="utf-8")  # read by from_file
        merges.append(Merge(name, Path(path).name, recipe.config, source, recipe, path))
    return merges


def _same_models(recipes: list[Recipe]) -> list[ResolvedModel]:
    """The first recipe's models, resolved (base first), once every recipe is
    known to merge the same ones: the same folders (or Hub snapshots), however
    each recipe spells them."""
    first = resolve_models(recipes[0])
    known = {os.path.realpath(model.path): model.name for model in first}
    for recipe in recipes[1:]:
        theirs = {
            os.path.realpath(model.path): model.name for model in resolve_models(recipe)
        }
        extra = [name for path, name in theirs.items() if path not in known]
        lacking = [name for path, name in known.items() if path not in theirs]
        if extra or lacking:
            difference = [f"it also merges {', '.join(extra)}"] if extra else []
            difference += [f"it lacks {', '.join(lacking)}"] if lacking else []
            raise CompareError(
                f"{recipe.where}: merges other models than {recipes[0].where} ("
                + "; ".join(difference)
                + "); compare recipes of the same models"
            )
    return first


def plain_average(config: MergeConfiguration) -> MergeConfiguration:
    """mergekit's `linear` recipe for the models of `config` at equal weights, in
    its dtype and with its tokenizer settings; the base comes first, so the
    average's configuration and tokenizer are the base's, as in an NER merge."""
    return MergeConfiguration(
        merge_method="linear",
        models=[
            InputModelDefinition(model=model, parameters={"weight": 1.0})
            for model in candidate_models(config)
        ],
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        tokenizer_source=config.tokenizer_source,
        tokenizer=config.tokenizer,
        chat_template=config.chat_template,
    )


def _merge(
    merge: Merge,
    out: Path,
    models: list[ResolvedModel],
    options: MergeOptions,
    progress: Progress,
) -> None:
    """One merge into `out`: an NER recipe through the NER pipeline (its plan and
    merge steps timed apart), the average by mergekit itself."""
    run_merge = inspect.unwrap(mergekit.merge.run_merge)  # not the hook's wrap
    if merge.recipe is not None:
        register()  # done by the hook, unless NER_MERGE_DISABLE_HOOK=1
        pipeline.merge(
            merge.recipe,
            str(out),
            options,
            merge.source,
            run_merge,
            lambda kind: progress.step(kind, merge.label),
        )
        return
    with progress.step("merge", merge.label), mergekit_notices_hidden():
        run_merge(
            with_local_models(merge.config, models),
            str(out),
            options.model_copy(update={"write_model_card": False}),
            config_source=merge.source,
        )
        write_model_card(out, merge.config, merge.source)


def _write_table(
    folder: Path,
    table: PerplexityTable,
    inputs: int,
    merges: list[Merge],
    texts: Sequence[str],
) -> None:
    """compare.md, compare.json and (with matplotlib) compare.png; the table's
    first `inputs` rows are the input models, the others `merges`."""
    kinds = [("input", None, None)] * inputs
    kinds += [
        ("recipe" if merge.recipe else LINEAR, merge.recipe_file, merge.name)
        for merge in merges
    ]
    rows = [
        {
            "name": label,
            "kind": kind,
            **({"recipe": recipe} if recipe else {}),
            **({"folder": name} if name else {}),
            "perplexity": dict(zip(table.texts, values)),
        }
        for label, values, (kind, recipe, name) in zip(
            table.models, table.values, kinds
        )
    ]
    best = {
        text: table.models[list(column).index(lowest)]
        for text, column, lowest in zip(table.texts, zip(*table.values), table.best())
    }
    document = {
        "device": table.device,
        "texts": [  # in column order
            {"name": name, "file": str(text)} for name, text in zip(table.texts, texts)
        ],
        "rows": rows,
        "best": best,
    }
    (folder / DATA_FILE).write_text(
        json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    merged = "\n".join(
        f"- `{merge.label}`: folder `{merge.name}/`"
        + (f", recipe `{merge.recipe_file}`" if merge.recipe_file else "")
        for merge in merges
    )
    (folder / TABLE_FILE).write_text(
        "# Perplexity of the inputs and each merge\n\n"
        f"Lower is better; the best on each text in bold ({table.device}).\n\n"
        f"{table.markdown()}\n\nMerges:\n{merged}\n",
        encoding="utf-8",
    )
    try:
        from ner_merge.evaluate.compare_figure import write_comparison_figure
    except ImportError as error:  # matplotlib is the optional `report` extra
        LOG.warning(
            "skipping %s: %s (install the extra: pip install 'ner-merge[report]')",
            FIGURE_FILE,
            error,
        )
        return
    write_comparison_figure(table, folder / FIGURE_FILE)
