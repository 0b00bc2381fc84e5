"""Read a mergekit recipe with `merge_method: ner` and check it before any work.

The recipe is an ordinary mergekit YAML document; `Recipe` pairs mergekit's own
validated `MergeConfiguration` with the NER options from its `parameters:` and
each fine-tuned model's options from its `models:` entry's `parameters:`.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from pydantic import ValidationError

from ner_merge.errors import RecipeError
from ner_merge.options import (
    NerModelOptions,
    NerOptions,
    format_validation_error,
    split_patterns,
)

METHOD_NAME = "ner"


@dataclass(frozen=True)
class Recipe:
    """A validated NER recipe: mergekit's configuration plus the NER options."""

    config: MergeConfiguration
    options: NerOptions
    where: str  # the file it came from, for error messages
    # Per candidate (see candidates()): tensor-name globs it may not supply.
    exclusions: tuple[tuple[str, ...], ...] = ()

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
        options = NerOptions.from_parameters(config.parameters, where)
        candidates = candidate_models(config)
        if len(candidates) < 2:
            raise RecipeError(
                f"{where}: models must list at least one fine-tuned model besides "
                f"the base {config.base_model}"
            )
        exclusions: dict[ModelReference, tuple[str, ...]] = {}
        for index, entry in enumerate(config.models or []):
            prefix = f"models.{index}.parameters"
            excluded = split_patterns(
                NerModelOptions.from_parameters(entry.parameters, where, prefix).exclude
            )
            if excluded and entry.model == config.base_model:
                raise RecipeError(
                    f"{where}: {prefix}.exclude: the base cannot be excluded, it "
                    "supplies every tensor no other model may"
                )
            exclusions[entry.model] = exclusions.get(entry.model, ()) + excluded
        return cls(
            config,
            options,
            where,
            tuple(exclusions.get(model, ()) for model in candidates),
        )

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
        return candidate_models(self.config)


def candidate_models(config: MergeConfiguration) -> list[ModelReference]:
    """The configuration's base, then each other model once, in recipe order."""
    ordered = [config.base_model] + [model.model for model in config.models or []]
    return list(dict.fromkeys(ordered))
