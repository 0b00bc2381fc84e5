"""The model card of an NER merge, written by us rather than by mergekit.

mergekit lists a card's models in `referenced_models()` order, which comes from
a set and so changes from run to run; and it would see the resolved local paths
the merge reads from, not the Hub ids the user wrote. Handing its card generator
the recipe as written, in recipe order, fixes both and keeps the output
deterministic.

mergekit also asks the Hub whether a path that exists locally and has one slash
(`models/base`) is a Hub repository, so an offline merge of local folders would
fail at its very end. Here a folder that exists is local, as it was when the
models were resolved (`ner_merge.models.resolve_model`): the card never asks.
"""

import os
from pathlib import Path
from unittest import mock

import mergekit.card
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from ner_merge.recipe import Recipe, candidate_models

CARD_FILE = "README.md"
RECIPE_COPY_FILE = "mergekit_config.yml"  # the name mergekit gives its copy


class _RecipeOrderConfiguration(MergeConfiguration):
    """A configuration whose models come out in recipe order, base first."""

    def referenced_models(self) -> list[ModelReference]:
        return candidate_models(self)


def is_hub_model(path: str) -> bool:
    """Whether a recipe's model path named a Hub repository: a resolved model
    that is not a local folder came from the Hub."""
    return not os.path.isdir(path)


def write_model_card(out: Path, recipe: Recipe, config_source: str) -> None:
    """mergekit's card and recipe copy, as mergekit would write them, in order."""
    config = _RecipeOrderConfiguration.model_validate(recipe.config.model_dump())
    with mock.patch.object(mergekit.card, "is_hf", is_hub_model):
        card = mergekit.card.generate_card(
            config=config, config_yaml=config_source, name=out.name
        )
    (out / CARD_FILE).write_text(card, encoding="utf-8")
    (out / RECIPE_COPY_FILE).write_text(config_source, encoding="utf-8")
