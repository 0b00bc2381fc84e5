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
