"""The `ner-merge` command: plan and inspect a merge without running it,
evaluate the result, and compare recipes.

Merging itself is the stock `mergekit-yaml RECIPE OUT`; this CLI adds what
mergekit has no verb for.

torch, mergekit and the planner take seconds to import, so each command imports
what it needs when it runs: `--help`, `--version` and `show` stay instant.
"""

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ner_merge import __version__
from ner_merge.errors import NerMergeError
from ner_merge.threads import wait_passively

wait_passively()  # before any command imports torch (see ner_merge.threads)

if TYPE_CHECKING:
    from ner_merge.source_map import SourceMap


def _print_version(context: click.Context, _: click.Parameter, value: bool) -> None:
    """`--version`: ours and mergekit's, the two a bug report needs."""
    if not value or context.resilient_parsing:
        return
    from importlib import metadata

    try:
        mergekit_version = metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        mergekit_version = "not installed"
    click.echo(f"ner-merge {__version__} (mergekit {mergekit_version})")
    context.exit()


@click.group()
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the ner-merge and mergekit versions and exit.",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Log progress details, and show the progress bars of transformers "
    "and mergekit.",
)
@click.pass_context
def main(context: click.Context, verbose: bool) -> None:
    """Normalized-Effective-Rank layer selection for mergekit.

    Merging is done by mergekit itself: `mergekit-yaml RECIPE OUT` with a recipe
    that says `merge_method: ner`. These commands plan a merge without running
    it, show a plan, and measure the result.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    context.obj = {"verbose": verbose}


def _verbose(context: click.Context) -> bool:
    return context.find_root().obj["verbose"]


def _quiet_transformers(context: click.Context) -> None:
    """No transformers progress bars ("Loading weights", "Writing model shards":
    one per model loaded or saved) unless -v asked for detail."""
    if not _verbose(context):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def check_output_file(path: str) -> None:
    """Fail before scoring if `path` could not be written after it, or holds a
    file of the user's that a map would overwrite.

    The nearest existing folder above it must be a folder we can create files
    in (tried with a temporary file: permission bits lie to root and on
    read-only mounts). Missing folders are created only when the map is saved,
    so a failed plan leaves nothing behind.
    """
    target = Path(path).absolute()
    if target.is_dir():
        raise click.ClickException(f"-o {path}: is a folder; give a file name")
    if target.exists() and not _holds_a_source_map(target):
        raise click.ClickException(
            f"-o {path}: exists and is not a source map; plan overwrites only a "
            "map, so choose another name or move that file yourself"
        )
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise click.ClickException(f"-o {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise click.ClickException(
            f"-o {path}: cannot write in {existing}: {error.strerror}"
        ) from None


def _holds_a_source_map(path: Path) -> bool:
    """Whether a file is a source map (of any version, valid or not): the one
    kind of file `plan -o` may replace, since a plan wrote it."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and {"format_version", "tensors"} <= set(document)


def save_map(source_map: "SourceMap", path: str) -> None:
    """Write the map whole or not at all (an earlier map stays as it was),
    creating its folder; an OS error is one line, not a trace."""
    from ner_merge.cache import write_text_atomically
    from ner_merge.space import is_disk_full

    existed = Path(path).exists()
    try:
        write_text_atomically(Path(path), source_map.to_json())
    except OSError as error:
        if is_disk_full(error):
            kept = "the earlier map is unchanged" if existed else "no file was made"
            raise click.ClickException(
                f"-o {path}: its disk filled up while the map was written; "
                f"nothing was written and {kept}. Free some space there and "
                "plan again"
            ) from None
        raise click.ClickException(
            f"{path}: cannot write source map: {error.strerror}"
        ) from None


def _require_mergekit() -> None:
    """Refuse, in one line, to plan or merge with an unsupported mergekit."""
    from ner_merge.mergekit_range import mergekit_problem

    problem = mergekit_problem()
    if problem is not None:
        raise click.ClickException(problem)


@main.command("plan")
@click.argument("recipe_file", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Where to write the source map (JSON); missing folders are created.",
)
@click.option(
    "--show", is_flag=True, help="Print each layer's sources and score margins."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--cuda", is_flag=True, help="Score on the GPU (as mergekit-yaml's).")
@click.option(
    "--device",
    help="Score on this torch device, e.g. cuda:1 or auto (as mergekit-yaml's).",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Score every copy in float64 (the recipe option `scoring: exact`). By "
    "default scores are float32 with error bounds, and near ties are rescored in "
    "float64: the choices are the same either way.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Tensors scored side by side, one thread each (default: from the cores "
    "and memory; $NER_MERGE_WORKERS). The map is the same for any count.",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Score on this Ray cluster (an address, or auto; $NER_MERGE_RAY). "
    "Needs ner-merge[ray].",
)
def plan_command(
    recipe_file: str,
    output: str | None,
    show: bool,
    quiet: bool,
    cuda: bool,
    device: str | None,
    exact: bool,
    workers: int | None,
    ray_address: str | None,
) -> None:
    """Score RECIPE_FILE's models and write or show the source map, merging nothing.

    To merge, run `mergekit-yaml RECIPE_FILE OUT`, adding
    `parameters: {source_map: FILE}` to use a saved (or edited) map.
    """
    if not output and not show:
        raise click.UsageError("give -o FILE to write the map, --show to print it")
    _require_mergekit()
    from mergekit.options import MergeOptions

    from ner_merge.inventory import resolve_models
    from ner_merge.planner import plan
    from ner_merge.recipe import Recipe
    from ner_merge.report import plan_table
    from ner_merge.space import check_room, map_bytes
    from ner_merge.workers import choose_workers

    try:
        recipe = Recipe.from_file(recipe_file)
        if exact:
            recipe = recipe.with_options("--exact", scoring="exact")
        if output:
            check_output_file(output)
        options = MergeOptions(cuda=cuda, device=device, quiet=quiet)
        scorers = choose_workers(workers, ray_address)
        models = resolve_models(recipe)
        if output:  # the map's size is bounded by the base's tensor count
            needed = map_bytes(len(models[0].headers), len(models))
            check_room(Path(output).absolute().parent, needed, f"-o {output}")
        source_map = plan(recipe, options, quiet=quiet, models=models, workers=scorers)
    except NerMergeError as error:
        raise click.ClickException(str(error)) from error
    if show:
        click.echo(plan_table(source_map))
    if output:
        save_map(source_map, output)
        shares = ", ".join(
            f"{name}: {n}" for name, n in source_map.share_by_model().items()
        )
        click.echo(f"wrote {output} ({len(source_map.tensors)} tensors; {shares})")


@main.command("show")
@click.argument("map_file", type=click.Path())
def show_command(map_file: str) -> None:
    """Print a source map: a file from `plan -o`, or a merge's output folder
    (its ner_source_map.json)."""
    from ner_merge.report import plan_table
    from ner_merge.source_map import SOURCE_MAP_FILE, SourceMap

    path = Path(map_file)
    if path.is_dir():
        path = path / SOURCE_MAP_FILE
        if not path.is_file():
            raise click.ClickException(
                f"{map_file}: no {SOURCE_MAP_FILE} in this folder; give a "
                "map file, or the output folder of an NER merge"
            )
    try:
        click.echo(plan_table(SourceMap.load(path)))
    except NerMergeError as error:
        raise click.ClickException(str(error)) from error


@main.command("eval")
@click.argument(
    "models", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True)
)
@click.option(
    "-t",
    "--text",
    "texts",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="A text file to score (repeatable). Default: the demo's held-out texts.",
)
@click.option(
    "--window",
    type=click.IntRange(min=2),
    help="Tokens per window. Default: each model's max_position_embeddings "
    "(capped for long-context models).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    help="Default: cuda when available.",
)
@click.option("--quiet", is_flag=True, help="No progress line per model.")
def eval_command(
    models: tuple[str, ...],
    texts: tuple[str, ...],
    window: int | None,
    device: str | None,
    quiet: bool,
) -> None:
    """Perplexity of each model folder in MODELS on held-out texts, as a table.

    A line per model goes to stderr as it starts; the table goes to stdout.
    """
    from transformers.utils import logging as transformers_logging

    from ner_merge.evaluate import DEMO_TEXTS, evaluate

    transformers_logging.disable_progress_bar()  # a bar per model buries the table
    progress = None if quiet else lambda line: click.echo(line, err=True)
    try:
        table = evaluate(models, texts or DEMO_TEXTS, device, window, progress)
    except NerMergeError as error:
        raise click.ClickException(str(error)) from error
    click.echo(table.render())


@main.command("compare")
@click.argument(
    "recipe_files", nargs=-1, required=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--linear",
    is_flag=True,
    help="Also merge a plain average of the same models (mergekit's linear, "
    "equal weights), as DIR/linear.",
)
@click.option(
    "-t",
    "--text",
    "texts",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="A text file to score every model on (repeatable).",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    default="compare-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="The folder for the merges and the table (replaced whole, and only "
    "if a comparison wrote it).",
)
@click.pass_context
def compare_command(
    context: click.Context,
    recipe_files: tuple[str, ...],
    linear: bool,
    texts: tuple[str, ...],
    out_dir: str,
) -> None:
    """Which recipe wins? Merge each RECIPE_FILE (NER recipes of the same models,
    other options) into DIR/NAME, with --linear also their plain average; score
    every merge and input model on every text; print the table and write it into
    DIR (compare.md, compare.json, compare.png).

    A line per step goes to stderr as it runs; the table goes to stdout.
    """
    _require_mergekit()
    from ner_merge.compare import compare

    _quiet_transformers(context)
    try:
        table = compare(recipe_files, texts, out_dir, linear, verbose=_verbose(context))
    except NerMergeError as error:
        raise click.ClickException(str(error)) from error
    click.echo(table.render())


@main.command("demo")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.pass_context
def demo_command(context: click.Context, out_dir: str) -> None:
    """Train the demo trio (tiny Qwen2 base + two fine-tunes) into OUT_DIR."""
    from ner_merge.demo import build

    _quiet_transformers(context)
    build(Path(out_dir), click.echo)


@main.command("generate")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("prompt")
@click.option("--tokens", default=40, show_default=True, help="Tokens to generate.")
@click.pass_context
def generate_command(
    context: click.Context, model_dir: str, prompt: str, tokens: int
) -> None:
    """Greedy sample from a model folder: a quick look at a merge's output."""
    from ner_merge.demo import generate

    _quiet_transformers(context)
    click.echo(f"{model_dir}: {generate(model_dir, prompt, tokens)!r}")
