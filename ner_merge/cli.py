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
from ner_merge.host.interrupt import end_on_interrupt, interrupted
from ner_merge.scoring.threads import wait_passively

wait_passively()  # before any command imports torch (see ner_merge.scoring.threads)

if TYPE_CHECKING:
    from ner_merge.plan.source_map import SourceMap


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


class _Commands(click.Group):
    """The commands; Ctrl-C in any of them ends with one line saying what it
    left, and exit code 130 (0 if its output was already published)."""

    def invoke(self, context: click.Context):
        try:
            return super().invoke(context)
        except KeyboardInterrupt as interrupt:
            program = f"ner-merge {context.invoked_subcommand or ''}".rstrip()
            raise SystemExit(interrupted(program, interrupt)) from None


# One grammar for every command: these options mean the same everywhere, and the
# output ones are taken before the command name too (`ner-merge -v compare`).
def _note(context: click.Context, parameter: click.Parameter, value: bool) -> None:
    """Keep a switch where every command sees it (the meta dictionary is shared by
    the group's context and the command's), whichever side of the name it was."""
    if value:
        context.meta[f"ner_merge.{parameter.name}"] = True


def output_options(command):
    """-v/--verbose and --quiet, on the group and on every command."""
    command = click.option(
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=_note,
        help="No progress lines or bars: only results, warnings and errors.",
    )(command)
    return click.option(
        "-v",
        "--verbose",
        is_flag=True,
        expose_value=False,
        callback=_note,
        help="Log progress details, and show the progress bars of transformers "
        "and mergekit.",
    )(command)


def device_options(command):
    """--cuda and --device, as mergekit-yaml's, on every command that computes."""
    command = click.option(
        "--device",
        metavar="DEVICE",
        help="Run on this torch device: cpu, cuda, cuda:1, or auto (CUDA when "
        "available); as mergekit-yaml's. Tried before any model is read.",
    )(command)
    return click.option(
        "--cuda", is_flag=True, help="Short for --device cuda, as mergekit-yaml's."
    )(command)


def texts_option(command):
    """-t, the texts `eval` and `compare` score."""
    return click.option(
        "-t",
        "--text",
        "texts",
        multiple=True,
        type=click.Path(dir_okay=False),
        help="A text file to score every model on (repeatable). Default: the "
        "demo's held-out texts (ner_merge/demo/texts/heldout_*.txt).",
    )(command)


def verbosity(context: click.Context) -> tuple[bool, bool]:
    """(verbose, quiet), as given on either side of the command's name; sets
    the log level."""
    verbose = context.meta.get("ner_merge.verbose", False)
    quiet = context.meta.get("ner_merge.quiet", False)
    if verbose and quiet:
        raise click.UsageError("-v and --quiet: choose one")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    return verbose, quiet


def quiet_transformers(verbose: bool) -> None:
    """No transformers progress bars ("Loading weights", "Writing model shards":
    one per model loaded or saved) unless -v asked for detail."""
    if not verbose:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def chosen_device(cuda: bool, device: str | None) -> str | None:
    """--device, else `cuda` for --cuda, else None (the command's default): the
    rule of mergekit's options, where --device wins."""
    return device or ("cuda" if cuda else None)


@click.group(cls=_Commands)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the ner-merge and mergekit versions and exit.",
)
@output_options
def main() -> None:
    """Normalized-Effective-Rank layer selection for mergekit.

    Merging is done by mergekit itself: `mergekit-yaml RECIPE OUT` with a recipe
    that says `merge_method: ner`. These commands plan a merge without running
    it, show a plan, and measure the result.

    -v/--verbose and --quiet are taken before or after the command's name.
    """


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
    from ner_merge.host.space import is_disk_full
    from ner_merge.models.cache_folder import write_text_atomically

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
    from ner_merge.host.mergekit_range import mergekit_problem

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
@device_options
@click.option(
    "--scoring",
    type=click.Choice(["auto", "fast", "exact"]),
    help="The recipe option `scoring`, set here: `exact` scores every copy in "
    "float64; `fast` in float32 with error bounds, rescoring near ties in "
    "float64; `auto` (the default) is exact on a CPU, fast on a GPU. The choices "
    "are the same either way.",
)
@click.option("--exact", is_flag=True, help="Short for --scoring exact.")
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
@click.option(
    "--lora-merge-cache",
    type=click.Path(file_okay=False),
    help="Where LoRA fine-tunes (model: BASE+ADAPTER) are merged before scoring, "
    "as mergekit-yaml's (default: a folder in the cache).",
)
@click.option(
    "--lora-merge-dtype",
    help="The dtype LoRA adapters are merged in, as mergekit-yaml's.",
)
@output_options
@click.pass_context
def plan_command(
    context: click.Context,
    recipe_file: str,
    output: str | None,
    show: bool,
    cuda: bool,
    device: str | None,
    scoring: str | None,
    exact: bool,
    workers: int | None,
    ray_address: str | None,
    lora_merge_cache: str | None,
    lora_merge_dtype: str | None,
) -> None:
    """Score RECIPE_FILE's models and write or show the source map, merging nothing.

    To merge, run `mergekit-yaml RECIPE_FILE OUT`, adding
    `parameters: {source_map: FILE}` to use a saved (or edited) map. Scores on
    the CPU unless --device or --cuda says otherwise.
    """
    _, quiet = verbosity(context)
    if not output and not show:
        raise click.UsageError("give -o FILE to write the map, --show to print it")
    if exact and scoring not in (None, "exact"):
        raise click.UsageError(f"--exact contradicts --scoring {scoring}")
    _require_mergekit()
    from mergekit.options import MergeOptions

    from ner_merge.host.space import check_room, map_bytes
    from ner_merge.models.inventory import resolve_models
    from ner_merge.plan.planner import plan
    from ner_merge.recipe.recipe import Recipe
    from ner_merge.report.markdown import plan_table
    from ner_merge.scoring.workers import choose_workers

    try:
        recipe = Recipe.from_file(recipe_file)
        if exact:
            recipe = recipe.with_options("--exact", scoring="exact")
        elif scoring:
            recipe = recipe.with_options(f"--scoring {scoring}", scoring=scoring)
        if output:
            check_output_file(output)
        options = MergeOptions(
            cuda=cuda,
            device=device,
            quiet=quiet,
            lora_merge_cache=lora_merge_cache,
            lora_merge_dtype=lora_merge_dtype,
        )
        scorers = choose_workers(workers, ray_address)
        models = resolve_models(recipe, options)
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
@output_options
@click.pass_context
def show_command(context: click.Context, map_file: str) -> None:
    """Print a source map: a file from `plan -o`, or a merge's output folder
    (its ner_source_map.json)."""
    verbosity(context)
    from ner_merge.plan.source_map import SOURCE_MAP_FILE, SourceMap
    from ner_merge.report.markdown import plan_table

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
@texts_option
@click.option(
    "--window",
    type=click.IntRange(min=2),
    help="Tokens per window. Default: each model's max_position_embeddings "
    "(capped for long-context models).",
)
@device_options
@output_options
@click.pass_context
def eval_command(
    context: click.Context,
    models: tuple[str, ...],
    texts: tuple[str, ...],
    window: int | None,
    cuda: bool,
    device: str | None,
) -> None:
    """Perplexity of each model folder in MODELS on held-out texts, as a table.

    A line per model goes to stderr as it starts; the table goes to stdout. Runs
    on CUDA when available unless --device or --cuda says otherwise.
    """
    from transformers.utils import logging as transformers_logging

    from ner_merge.evaluate.perplexity import DEMO_TEXTS, evaluate

    _, quiet = verbosity(context)
    transformers_logging.disable_progress_bar()  # a bar per model buries the table
    progress = None if quiet else lambda line: click.echo(line, err=True)
    try:
        where = chosen_device(cuda, device)
        table = evaluate(models, texts or DEMO_TEXTS, where, window, progress)
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
@texts_option
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
@device_options
@output_options
@click.pass_context
def compare_command(
    context: click.Context,
    recipe_files: tuple[str, ...],
    linear: bool,
    texts: tuple[str, ...],
    out_dir: str,
    cuda: bool,
    device: str | None,
) -> None:
    """Which recipe wins? Merge each RECIPE_FILE (NER recipes of the same models,
    other options) into DIR/NAME, with --linear also their plain average; score
    every merge and input model on every text; print the table and write it into
    DIR (compare.md, compare.json, compare.png).

    A line per step goes to stderr as it runs; the table goes to stdout. Merges
    on the CPU and scores on CUDA when available, unless --device or --cuda
    says where to do both.
    """
    _require_mergekit()
    from ner_merge.evaluate.compare import compare
    from ner_merge.evaluate.perplexity import DEMO_TEXTS

    verbose, quiet = verbosity(context)
    quiet_transformers(verbose)
    try:
        table = compare(
            recipe_files,
            texts or DEMO_TEXTS,
            out_dir,
            linear,
            verbose=verbose,
            quiet=quiet,
            device=chosen_device(cuda, device),
        )
    except NerMergeError as error:
        raise click.ClickException(str(error)) from error
    end_on_interrupt(0, f"ner-merge compare: {out_dir} is complete")
    click.echo(table.render())


@main.command("demo")
@click.argument("out_dir", type=click.Path(file_okay=False))
@output_options
@click.pass_context
def demo_command(context: click.Context, out_dir: str) -> None:
    """Train the demo trio (tiny Qwen2 base + two fine-tunes) into OUT_DIR, on
    one CPU thread, and say how each model trained (--quiet: nothing)."""
    from ner_merge.demo import build

    verbose, quiet = verbosity(context)
    quiet_transformers(verbose)
    build(Path(out_dir), (lambda _: None) if quiet else click.echo)


@main.command("generate")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("prompt")
@click.option("--tokens", default=40, show_default=True, help="Tokens to generate.")
@output_options
@click.pass_context
def generate_command(
    context: click.Context, model_dir: str, prompt: str, tokens: int
) -> None:
    """Greedy sample from a model folder: a quick look at a merge's output."""
    from ner_merge.demo import generate

    verbose, _ = verbosity(context)
    quiet_transformers(verbose)
    click.echo(f"{model_dir}: {generate(model_dir, prompt, tokens)!r}")
