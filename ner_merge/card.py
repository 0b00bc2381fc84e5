"""The model card of an NER merge, written by us rather than by mergekit.

mergekit lists a card's models in `referenced_models()` order, which comes from
a set and so changes from run to run; and it would see the resolved local paths
the merge reads from, not the Hub ids the user wrote. Handing its card generator
the recipe as written, in recipe order, fixes both and keeps the output
deterministic.
"""

from pathlib import Path

from mergekit.card import generate_card
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from ner_merge.recipe import Recipe, candidate_models

CARD_FILE = "README.md"
RECIPE_COPY_FILE = "mergekit_config.yml"  # the name mergekit gives its copy


class _RecipeOrderConfiguration(MergeConfiguration):
    """A configuration whose models come out in recipe order, base first."""

    def referenced_models(self) -> list[ModelReference]:
        return candidate_models(self)


def write_model_card(out: Path, recipe: Recipe, config_source: str) -> None:
    """mergekit's card and recipe copy, as mergekit would write them, in order."""
    config = _RecipeOrderConfiguration.model_validate(recipe.config.model_dump())
    card = generate_card(config=config, config_yaml=config_source, name=out.name)
    (out / CARD_FILE).write_text(card, encoding="utf-8")
    (out / RECIPE_COPY_FILE).write_text(config_source, encoding="utf-8")
