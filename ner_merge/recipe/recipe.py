"""Read a mergekit recipe with `merge_method: ner` and check it before any work.

The recipe is an ordinary mergekit YAML document; `Recipe` pairs mergekit's own
validated `MergeConfiguration` with the NER options from its `parameters:` and
each fine-tuned model's options from its `models:` entry's `parameters:`.

Every problem found is reported at once, one `FILE: field: problem` line each,
so that a recipe is fixed in one round rather than one error per run. Keys that
mergekit would silently ignore (a misspelt `paramters:`) and a `dtype` mergekit
would only reject after the models are scored are caught here too.
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
import yaml
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import InputModelDefinition, MergeConfiguration
from pydantic import BaseModel, ValidationError

from ner_merge.errors import RecipeError
from ner_merge.recipe.options import (
    NerModelOptions,
    NerOptions,
    split_patterns,
    unknown_key_problem,
    validation_problems,
)

METHOD_NAME = "ner"

# The recipe fields naming a dtype, each checked against the names mergekit takes.
DTYPE_FIELDS = ("dtype", "out_dtype")


@dataclass(frozen=True)
class Recipe:
    """A validated NER recipe: mergekit's configuration plus the NER options."""

    config: MergeConfiguration
    options: NerOptions
    where: str  # the file it came from, for error messages
    # Per candidate (see candidates()): tensor-name globs it may not supply.
    exclusions: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_config(
        cls,
        config: MergeConfiguration,
        where: str = "recipe",
        source: str | None = None,
    ) -> "Recipe":
        """Check the NER-specific parts of an already parsed mergekit configuration.

        source: the YAML text mergekit parsed (`run_merge`'s `config_source`), if
        known. mergekit drops keys it does not know while parsing, so only the
        text shows a misspelt field; without it, such keys go unnoticed.
        """
        return cls._validated(config, where, _mapping_or_none(source))

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
        _require_ner_method(document.get("merge_method", METHOD_NAME), where)
        try:
            config = MergeConfiguration.model_validate(document)
        except ValidationError as error:
            problems = unknown_fields(document) + validation_problems(error)
            raise RecipeError(_joined(where, problems)) from None
        except (ValueError, RuntimeError) as error:  # raised inside mergekit validators
            problems = unknown_fields(document) + [f"invalid recipe: {error}"]
            raise RecipeError(_joined(where, problems)) from None
        return cls._validated(config, where, document)

    @classmethod
    def _validated(
        cls,
        config: MergeConfiguration,
        where: str,
        document: Mapping[str, Any] | None,
    ) -> "Recipe":
        """The recipe, or a RecipeError listing every problem found in it."""
        _require_ner_method(config.merge_method, where)
        problems = unknown_fields(document) if document is not None else []
        problems += dtype_problems(config)
        if config.slices or config.modules:
            problems.append(
                "slices/modules: merge_method: ner takes `base_model` and `models`, "
                "not `slices` or `modules`: it chooses every tensor's source itself"
            )
        if config.base_model is None:
            problems.append(
                "base_model: base_model is required: ties go to the base, and the "
                "config and tokenizer of the result come from it"
            )
        elif len(candidate_models(config)) < 2:
            problems.append(
                "models: models must list at least one fine-tuned model besides "
                f"the base {config.base_model}"
            )
        problems += repeated_models(config)
        options, found = _checked_options(NerOptions, config.parameters, "parameters")
        problems += found
        exclusions: dict[ModelReference, tuple[str, ...]] = {}
        for index, entry in enumerate(config.models or []):
            prefix = f"models.{index}.parameters"
            model_options, found = _checked_options(
                NerModelOptions, entry.parameters, prefix
            )
            problems += found
            excluded = split_patterns(model_options and model_options.exclude)
            if excluded and entry.model == config.base_model:
                problems.append(
                    f"{prefix}.exclude: the base cannot be excluded, it supplies "
                    "every tensor no other model may"
                )
            exclusions[entry.model] = excluded
        if problems:
            raise RecipeError(_joined(where, problems))
        return cls(
            config,
            options,
            where,
            tuple(exclusions.get(model, ()) for model in candidate_models(config)),
        )

    def with_options(self, given: str, **changes: Any) -> "Recipe":
        """The recipe with NER options set from elsewhere (`given`: a command-line
        option, for messages), checked as if the recipe had them."""
        wanted = self.options.model_dump(exclude_unset=True) | changes
        options, problems = _checked_options(NerOptions, wanted, "parameters")
        if problems:
            where = f"{self.where} with {given}"
            raise RecipeError("\n".join(f"{where}: {line}" for line in problems))
        return replace(self, options=options)

    def candidates(self) -> list[ModelReference]:
        """Base first, then each fine-tuned model once, in recipe order.

        This order is the tie rule: on equal scores the earlier candidate wins.
        """
        return candidate_models(self.config)


def candidate_models(config: MergeConfiguration) -> list[ModelReference]:
    """The configuration's base (if it has one: a plain average has none), then
    each other model once, in recipe order."""
    ordered = [config.base_model] if config.base_model else []
    ordered += [model.model for model in config.models or []]
    return list(dict.fromkeys(ordered))


def repeated_models(config: MergeConfiguration) -> list[str]:
    """A problem line per fine-tuned model listed again under the same name.

    mergekit refuses such a recipe only after an NER plan has scored every model
    ("Duplicate merge inputs"). The base repeated under `models:` is fine: mergekit
    takes it, as recipes of its weighted methods do, and it is one candidate.
    (The same model under other spellings is found once models are resolved.)
    """
    first: dict[ModelReference, int] = {}
    problems = []
    for index, entry in enumerate(config.models or []):
        if entry.model == config.base_model:
            continue
        if entry.model in first:
            problems.append(
                f"models.{index}.model: {entry.model} is listed twice (also "
                f"models.{first[entry.model]}.model); list each model once"
            )
        first.setdefault(entry.model, index)
    return problems


def _joined(where: str, problems: list[str]) -> str:
    """One line per problem, each naming the file, as compilers do."""
    return "\n".join(f"{where}: {problem}" for problem in problems)


def _require_ner_method(method: object, where: str) -> None:
    """Anything but `merge_method: ner` is mergekit's business, not ours."""
    if method != METHOD_NAME:
        raise RecipeError(
            misspelt_method(method, where)
            or f"{where}: merge_method is {method!r}; "
            f"ner-merge handles merge_method: {METHOD_NAME}"
        )


def misspelt_method(method: object, where: str) -> str | None:
    """The refusal of a `merge_method` that reads as a slip for `ner`, or None.

    A slip is `ner` in other letter case, or with one letter added, dropped,
    changed or swapped with its neighbour (`nerr`, `ne`, `nre`), and not the
    name of a method mergekit knows. Any other name is left to mergekit, whose
    error for it is the right one: a typo of `linear` is not ours to explain.
    """
    if not isinstance(method, str) or method == METHOD_NAME:
        return None
    if _edits_apart(method.strip().lower(), METHOD_NAME) > 1:
        return None
    from mergekit.merge_methods import registered_methods

    if method in {known.spec.name for known in registered_methods()}:
        return None
    nerd = " (for the reference tool NERD's way, add compat: nerd under parameters)"
    return (
        f"{where}: merge_method: {method!r} is not a merge method; "
        f"did you mean {METHOD_NAME}?" + (nerd if method.lower() == "nerd" else "")
    )


def _edits_apart(one: str, other: str) -> int:
    """Letters added, dropped, changed or swapped with a neighbour to turn one
    string into the other (optimal string alignment distance)."""
    rows = [list(range(len(other) + 1))]
    for i, letter in enumerate(one, 1):
        row = [i]
        for j, theirs in enumerate(other, 1):
            row.append(
                min(
                    rows[-1][j] + 1,
                    row[j - 1] + 1,
                    rows[-1][j - 1] + (letter != theirs),
                )
            )
            if i > 1 and j > 1 and letter == other[j - 2] and one[i - 2] == theirs:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _mapping_or_none(source: str | None) -> Mapping[str, Any] | None:
    """The top-level mapping of recipe text, or None if it holds no single one
    (mergekit parsed it already; its own errors are the ones to show)."""
    if not source:
        return None
    try:
        document = yaml.safe_load(source)
    except yaml.YAMLError:
        return None
    return document if isinstance(document, Mapping) else None


def _field_names(model: type[BaseModel]) -> tuple[str, ...]:
    """A pydantic model's keys as a document may spell them (aliases too)."""
    names = []
    for name, field in model.model_fields.items():
        names.append(name)
        if isinstance(field.alias, str):
            names.append(field.alias)
    return tuple(dict.fromkeys(names))


def unknown_fields(document: Mapping[str, Any]) -> list[str]:
    """A problem line per key mergekit's configuration would silently drop.

    mergekit ignores unknown keys, so `paramters:` would lose every NER option
    without a word. Checked at the top level and in each `models:` entry.
    """
    problems = _unknown_keys(document, "", _field_names(MergeConfiguration))
    entries = document.get("models")
    entry_known = _field_names(InputModelDefinition)
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, Mapping):
            problems += _unknown_keys(entry, f"models.{index}.", entry_known)
    return problems


def _unknown_keys(
    mapping: Mapping[Any, Any], prefix: str, known: tuple[str, ...]
) -> list[str]:
    what = "not a recipe field" if not prefix else "not a field of a models: entry"
    return [
        f"{prefix}{key}: "
        + unknown_key_problem(str(key), known, f"{what}; mergekit would ignore it")
        for key in mapping
        if str(key) not in known
    ]


@cache
def float_dtype_names() -> tuple[str, ...]:
    """The floating-point dtype names mergekit accepts, from mergekit itself.

    Every torch dtype's name is offered to mergekit's `dtype_from_name`; those it
    takes and that are floating point are the valid recipe dtypes (the planner
    and merge read and write weights in it, so an integer dtype is no use).
    """
    names = []
    for name, value in sorted(vars(torch).items()):
        if not isinstance(value, torch.dtype):
            continue
        try:
            dtype = dtype_from_name(name)
        except RuntimeError:
            continue
        if dtype is not None and dtype.is_floating_point:
            names.append(name)
    return tuple(names)


def dtype_problems(config: MergeConfiguration) -> list[str]:
    """A problem line per dtype field mergekit would reject, or that is no float.

    mergekit looks the name up only when it loads tensors, after an NER plan has
    scored every model; checking here fails in a second instead.
    """
    problems = []
    for field in DTYPE_FIELDS:
        name = getattr(config, field)
        if not name:
            continue
        try:
            dtype = dtype_from_name(name)
        except RuntimeError:
            dtype = None
        if dtype is None or not dtype.is_floating_point:
            problems.append(
                f"{field}: {name!r} is not a floating-point dtype mergekit knows; "
                f"use one of {', '.join(float_dtype_names())}"
            )
    return problems


@cache
def blending_parameters() -> dict[str, tuple[str, ...]]:
    """Each parameter of mergekit's other merge methods, and the methods taking it.

    Read from mergekit's method registry, so it follows mergekit's version.
    """
    from mergekit.merge_methods import registered_methods

    methods: dict[str, list[str]] = {}
    for method in registered_methods():
        spec = method.spec
        if spec.name == METHOD_NAME:
            continue
        for parameter in spec.parameters:
            methods.setdefault(parameter.name, []).append(spec.name)
    # Shortest names first: the familiar methods (linear, ties) lead a message.
    return {
        name: tuple(sorted(found, key=lambda m: (len(m), m)))
        for name, found in methods.items()
    }


def _checked_options(
    kind: type[NerOptions] | type[NerModelOptions],
    parameters: Mapping[str, Any] | None,
    prefix: str,
) -> tuple[Any, list[str]]:
    """Validate one `parameters:` mapping; a problem line per bad key.

    A parameter of mergekit's blending methods (`weight`, `density`, ...) is
    explained rather than called unknown: it is a common carry-over from a
    `linear` or `ties` recipe, and it means nothing to a method that copies.
    """
    parameters = dict(parameters or {})
    blending = blending_parameters()
    problems = []
    for key in list(parameters):
        if key in blending and key not in kind.model_fields:
            methods = blending[key]
            shown = ", ".join(methods[:3]) + (", ..." if len(methods) > 3 else "")
            problems.append(
                f"{prefix}.{key}: a blending parameter of other mergekit methods "
                f"({shown}); ner copies each tensor whole from one model and takes "
                "no weights, so remove it"
            )
            del parameters[key]
    options, found = kind.checked(parameters, prefix)
    return options, problems + found
