"""The model card of a merge, written by us rather than by mergekit.

mergekit's card generator (`mergekit.card.generate_card`) would, for our merges:
- list the models in `referenced_models()` order, which comes from a set and so
  changes from run to run;
- ask the Hub whether each path with one slash (`models/base`) is a repository,
  even when it is a local folder, so an offline merge would fail at its very end;
- name only Hub models in the card's `base_model:` metadata, leaving it empty
  (`base_model: []`) for a merge of local folders.

So the card is filled in here from mergekit's own template, in recipe order
(base first), asking no one: a model is a Hub id exactly when it is not a local
folder, the rule by which models were resolved
(`ner_merge.models.resolve.resolve_model`). Local folders are named by their path as the
recipe gives it, Hub models by their id.
"""

import os
from pathlib import Path

import yaml
from mergekit.card import CARD_TEMPLATE, method_md
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from ner_merge.recipe.recipe import candidate_models

CARD_FILE = "README.md"
RECIPE_COPY_FILE = "mergekit_config.yml"  # the name mergekit gives its copy
HUB_URL = "https://huggingface.co"


def _hub_id(model: ModelReference) -> str | None:
    """The Hub repository a recipe model names; None for a local folder."""
    path = model.model.path
    return None if os.path.isdir(path) else path


def _named(model: ModelReference) -> str:
    """The card's name for a model: a link for a Hub id, the path for a folder;
    a LoRA fine-tune's adapter follows its base, as the recipe writes it."""
    hub_id = _hub_id(model)
    if not hub_id:
        return str(model)
    adapter = f"+{model.lora}" if model.lora else ""
    return f"[{hub_id}]({HUB_URL}/{hub_id}){adapter}"


def model_card(config: MergeConfiguration, config_source: str, name: str) -> str:
    """mergekit's card for `config`, its models in recipe order, every model named
    in the `base_model:` metadata (Hub ids as ids, folders as given)."""
    models = candidate_models(config)
    metadata = {
        "base_model": [_hub_id(model) or str(model) for model in models],
        "tags": ["mergekit", "merge"],
        "library_name": "transformers",
    }
    base = config.base_model
    return CARD_TEMPLATE.format(
        metadata=yaml.dump(metadata),
        model_list="\n".join(f"* {_named(model)}" for model in models if model != base),
        base_text=f" using {_named(base)} as a base" if base else "",
        merge_method=method_md(config.merge_method),
        name=name,
        config_yaml=config_source,
    )


def write_model_card(out: Path, config: MergeConfiguration, config_source: str) -> None:
    """The card and mergekit's copy of the recipe, into the merge's folder `out`."""
    card = model_card(config, config_source, out.name)
    (out / CARD_FILE).write_text(card, encoding="utf-8")
    (out / RECIPE_COPY_FILE).write_text(config_source, encoding="utf-8")
