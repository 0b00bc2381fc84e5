"""The NER options a recipe sets under `parameters:`, validated before any tensor
is read.

mergekit passes unknown `parameters:` keys through silently, so this model is what
catches a misspelt option: it forbids extra keys and names the offending field.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ner_merge.errors import RecipeError


class NerOptions(BaseModel):
    """Options of `merge_method: ner` (all optional)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    source_map: str | None = Field(
        default=None,
        description="Path of a source map written by `ner-merge plan`. Without it, "
        "the planner scores the models and makes one just before the merge.",
    )

    @classmethod
    def from_parameters(
        cls, parameters: dict[str, Any] | None, where: str = "recipe"
    ) -> "NerOptions":
        """Validate a recipe's `parameters:`; errors name `where` and the key."""
        try:
            return cls.model_validate(dict(parameters or {}))
        except ValidationError as error:
            raise RecipeError(
                format_validation_error(error, where, "NER options", "parameters")
            ) from None


def format_validation_error(
    error: ValidationError, where: str, what: str, prefix: str | None = None
) -> str:
    """One line per problem, each naming the file and the dotted field."""
    lines = [f"{where}: invalid {what}:"]
    for problem in error.errors():
        location = (prefix, *problem["loc"]) if prefix else problem["loc"]
        field = ".".join(str(part) for part in location) or "(top level)"
        given = problem.get("input")
        shown = "" if problem["type"] == "missing" else f" (got {given!r})"
        lines.append(f"  {field}: {problem['msg']}{shown}")
    return "\n".join(lines)
