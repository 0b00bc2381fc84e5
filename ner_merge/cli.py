"""The `ner-merge` command: plan a merge without running it.

Merging itself is the stock `mergekit-yaml RECIPE OUT`; this CLI adds what
mergekit has no verb for.
"""

import logging

import click

from ner_merge.errors import NerMergeError
from ner_merge.planner import plan
from ner_merge.recipe import Recipe


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
    required=True,
    help="Where to write the source map (JSON).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def plan_command(recipe_file: str, output: str, quiet: bool) -> None:
    """Score RECIPE_FILE's models and write the source map, merging nothing."""
    try:
        source_map = plan(Recipe.from_file(recipe_file), quiet=quiet)
    except NerMergeError as error:
        raise click.ClickException(str(error)) from error
    source_map.save(output)
    shares = ", ".join(
        f"{name}: {n}" for name, n in source_map.share_by_model().items()
    )
    click.echo(f"wrote {output} ({len(source_map.tensors)} tensors; {shares})")


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
