"""The `ner-merge` command: plan and inspect a merge without running it, and
evaluate the result.

Merging itself is the stock `mergekit-yaml RECIPE OUT`; this CLI adds what
mergekit has no verb for.
"""

import logging

import click

from ner_merge.errors import NerMergeError
from ner_merge.planner import plan
from ner_merge.recipe import Recipe
from ner_merge.report import plan_table
from ner_merge.source_map import SourceMap


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """Normalized-Effective-Rank layer selection for mergekit."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)


@main.command("plan")
@click.argument("recipe_file", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Where to write the source map (JSON).",
)
@click.option(
    "--show", is_flag=True, help="Print each layer's sources and score margins."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def plan_command(recipe_file: str, output: str | None, show: bool, quiet: bool) -> None:
    """Score RECIPE_FILE's models and write or show the source map, merging nothing."""
    if not output and not show:
        raise click.UsageError("give -o FILE to write the map, --show to print it")
    try:
        source_map = plan(Recipe.from_file(recipe_file), quiet=quiet)
    except NerMergeError as error:
        raise click.ClickException(str(error)) from error
    if show:
        click.echo(plan_table(source_map))
    if output:
        source_map.save(output)
        shares = ", ".join(
            f"{name}: {n}" for name, n in source_map.share_by_model().items()
        )
        click.echo(f"wrote {output} ({len(source_map.tensors)} tensors; {shares})")


@main.command("show")
@click.argument("map_file", type=click.Path(dir_okay=False))
def show_command(map_file: str) -> None:
    """Print a source map (from `plan -o` or a merge's ner_source_map.json)."""
    try:
        click.echo(plan_table(SourceMap.load(map_file)))
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
def eval_command(
    models: tuple[str, ...],
    texts: tuple[str, ...],
    window: int | None,
    device: str | None,
) -> None:
    """Perplexity of each model folder in MODELS on held-out texts, as a table."""
    from transformers.utils import logging as transformers_logging

    from ner_merge.evaluate import DEMO_TEXTS, evaluate

    transformers_logging.disable_progress_bar()  # a bar per model buries the table
    try:
        table = evaluate(models, texts or DEMO_TEXTS, device, window)
    except NerMergeError as error:
        raise click.ClickException(str(error)) from error
    click.echo(table.render())


@main.command("demo")
@click.argument("out_dir", type=click.Path(file_okay=False))
def demo_command(out_dir: str) -> None:
    """Train the demo trio (tiny Qwen2 base + two fine-tunes) into OUT_DIR."""
    from pathlib import Path

    from ner_merge.demo import build

    logging.getLogger("ner_merge").setLevel(logging.INFO)
    for name, path in build(Path(out_dir)).items():
        click.echo(f"{name}: {path}")


@main.command("generate")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("prompt")
@click.option("--tokens", default=40, show_default=True, help="Tokens to generate.")
def generate_command(model_dir: str, prompt: str, tokens: int) -> None:
    """Greedy sample from a model folder: a quick look at a merge's output."""
    from ner_merge.demo import generate

    click.echo(f"{model_dir}: {generate(model_dir, prompt, tokens)!r}")
