"""Read a mergekit recipe with `merge_method: ner` and check it before any work.

The recipe is an ordinary mergekit YAML document; `Recipe` pairs mergekit's own
validated `MergeConfiguration` with the NER options from its `parameters:`.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from pydantic import ValidationError

from ner_merge.errors import RecipeError
from ner_merge.options import NerOptions, format_validation_error

METHOD_NAME = "ner"


@dataclass(frozen=True)
class Recipe:
    """A validated NER recipe: mergekit's configuration plus the NER options."""

    config: MergeConfiguration
    options: NerOptions
    where: str  # the file it came from, for error messages

    @classmethod
    def from_config(cls, config: MergeConfiguration, where: str = "recipe") -> "Recipe":
        """Check the NER-specific parts of an already parsed mergekit configuration."""
        if config.merge_method != METHOD_NAME:
            raise RecipeError(
                f"{where}: merge_method is {config.merge_method!r}; "
                f"ner-merge handles merge_method: {METHOD_NAME}"
            )
        if config.slices or config.modules:
            raise RecipeError(
                f"{where}: merge_method: ner takes `base_model` and `models`, "
                "not `slices` or `modules`: it chooses every tensor's source itself"
            )
        if config.base_model is None:
            raise RecipeError(
                f"{where}: base_model is required: ties go to the base, and the "
                "config and tokenizer of the result come from it"
            )
        recipe = cls(
            config, NerOptions.from_parameters(config.parameters, where), where
        )
        if len(recipe.candidates()) < 2:
            raise RecipeError(
                f"{where}: models must list at least one fine-tuned model besides "
                f"the base {config.base_model}"
            )
        return recipe

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        """Parse and validate a recipe file; every error names the file."""
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise RecipeError(
                f"{where}: cannot read recipe: {error.strerror}"
            ) from None
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise RecipeError(f"{where}: not valid YAML: {error}") from None
        if not isinstance(document, dict):
            raise RecipeError(
                f"{where}: expected a mapping of recipe fields at top level"
            )
        try:
            config = MergeConfiguration.model_validate(document)
        except ValidationError as error:
            raise RecipeError(format_validation_error(error, where, "recipe")) from None
        except (ValueError, RuntimeError) as error:  # raised inside mergekit validators
            raise RecipeError(f"{where}: invalid recipe: {error}") from None
        return cls.from_config(config, where)

    def candidates(self) -> list[ModelReference]:
        """Base first, then each fine-tuned model once, in recipe order.

        This order is the tie rule: on equal scores the earlier candidate wins.
        """
        ordered = [self.config.base_model]
        for model in self.config.models or []:
            if model.model not in ordered:
                ordered.append(model.model)
        return ordered
