"""The NER options a recipe sets under `parameters:`, validated before any tensor
is read.

mergekit passes unknown `parameters:` keys through silently, so this model is what
catches a misspelt option: it forbids extra keys and names the offending field.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ner_merge.errors import RecipeError

# Longest repr of an offending value quoted in an error message.
MAX_SHOWN_INPUT = 80


class NerOptions(BaseModel):
    """Options of `merge_method: ner` (all optional)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    source_map: str | None = Field(
        default=None,
        description="Path of a source map written by `ner-merge plan`. Without it, "
        "the planner scores the models and makes one just before the merge.",
    )

    nonfinite: Literal["error", "lose"] = Field(
        default="error",
        description="A scored matrix holding NaN or Inf: `error` stops the plan "
        "naming model and tensor; `lose` lets that copy lose to any finite one.",
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
        given = repr(problem.get("input"))
        if len(given) > MAX_SHOWN_INPUT:
            given = given[:MAX_SHOWN_INPUT] + "..."
        quoted = problem["loc"] and problem["type"] != "missing"
        shown = f" (got {given})" if quoted else ""
        lines.append(f"  {field}: {problem['msg']}{shown}")
    return "\n".join(lines)
