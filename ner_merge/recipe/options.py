"""The NER options a recipe sets under `parameters:`, validated before any tensor
is read.

mergekit passes unknown `parameters:` keys through silently, so these models are
what catch a misspelt option: they forbid extra keys and name the offending field.
mergekit allows only bool, int, float and str values there, so a list of tensor
name patterns is one comma-separated string.
"""

import difflib
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from ner_merge.errors import RecipeError

# Longest repr of an offending value quoted in an error message.
MAX_SHOWN_INPUT = 80

PATTERN_SEPARATOR = ","

Granularity = Literal["tensor", "module", "layer"]


def split_patterns(value: str | None) -> tuple[str, ...]:
    """`"a, b"` -> ("a", "b"): the tensor-name globs of a pattern option."""
    if value is None:
        return ()
    return tuple(part.strip() for part in value.split(PATTERN_SEPARATOR))


def _check_patterns(value: str | None) -> str | None:
    """Reject an empty pattern list or an empty item (a stray comma)."""
    if value is not None and not all(split_patterns(value)):
        raise ValueError(
            "expected comma-separated tensor name patterns (globs such as "
            "'lm_head.*'), with no empty item"
        )
    return value


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @classmethod
    def checked(
        cls, parameters: dict[str, Any] | None, prefix: str
    ) -> tuple["_Options | None", list[str]]:
        """Validate one `parameters:` mapping without raising, so that a recipe's
        problems in every section can be reported together.

        Returns the options (None if invalid) and one `field: problem` line per
        problem; an unknown key is told the known ones and the closest of them.
        """
        try:
            return cls.model_validate(dict(parameters or {})), []
        except ValidationError as error:
            return None, validation_problems(
                error, prefix, known=tuple(cls.model_fields)
            )

    @classmethod
    def from_parameters(
        cls, parameters: dict[str, Any] | None, where: str, prefix: str
    ) -> "_Options":
        """Validate one `parameters:` mapping; errors name `where` and the key."""
        options, problems = cls.checked(parameters, prefix)
        if options is None:
            raise RecipeError("\n".join(f"{where}: {line}" for line in problems))
        return options


class NerOptions(_Options):
    """Options of `merge_method: ner`, under the recipe's `parameters:` (optional)."""

    source_map: str | None = Field(
        default=None,
        description="Path of a source map written by `ner-merge plan`. Without it, "
        "the planner scores the models and makes one just before the merge.",
    )
    granularity: Granularity = Field(
        default="tensor",
        description="What chooses its source as one unit inside a decoder layer: "
        "each weight alone (`tensor`), each block, i.e. each child module of the "
        "layer that holds scored weights such as `self_attn` or `mlp` (`module`), "
        "or the whole layer (`layer`); a unit goes to the model with the highest "
        "mean NER over its scored weights.",
    )
    keep_base: str | None = Field(
        default=None,
        description="Comma-separated globs of output tensor names that always come "
        "from the base, e.g. 'model.embed_tokens.*,lm_head.*'. Each must match a "
        "tensor.",
    )
    compat: Literal["nerd"] | None = Field(
        default=None,
        description="`nerd`: score and choose as the reference tool NERD does "
        "(min-max scaled bfloat16 copies, every `.weight` scored, norms included).",
    )
    stabilize: bool | None = Field(
        default=None,
        description="NERD's second stage: in each `.weight` not taken from the "
        "base, put back the base's value wherever |base| >= |chosen| and "
        "|base| < median(|chosen|). Such tensors are no longer bit-identical to "
        "their source; the source map records the share of base values. Unset: "
        "on with `compat: nerd` (NERD runs it by default), off otherwise.",
    )

    scoring: Literal["auto", "fast", "exact"] = Field(
        default="auto",
        description="How scores are computed; every choice is the one float64 "
        "scores make, whichever. `fast`: float32 with a bound on each score's "
        "error, and float64 only for the copies that could win a near tie. "
        "`exact`: every score in float64. `auto` (the default): `exact` on a "
        "CPU, where float32 saved no time on any model set measured, `fast` on "
        "a GPU, whose float64 is slow. With `compat: nerd` only `auto`: NERD "
        "scores by its own float32 rule.",
    )

    nonfinite: Literal["error", "lose"] = Field(
        default="error",
        description="A copy of any floating-point tensor holding NaN or Inf: "
        "`error` stops the plan naming model and tensor; `lose` lets that copy "
        "lose, with everything that chooses with it.",
    )

    _check_keep_base = field_validator("keep_base")(_check_patterns)

    @field_validator("scoring")
    @classmethod
    def _scoring_is_ours(cls, value: str, info: ValidationInfo) -> str:
        if value != "auto" and info.data.get("compat") == "nerd":
            raise ValueError(
                "does not apply with compat: nerd, which scores by NERD's own "
                "float32 rule; remove one of them"
            )
        return value

    @property
    def stabilizes(self) -> bool:
        """Whether stabilize runs: as set, else with `compat: nerd` (NERD's default)."""
        return self.compat == "nerd" if self.stabilize is None else self.stabilize

    def planned(self) -> dict[str, object]:
        """What a source map records: the options that decide it, stabilize
        resolved; `scoring` as asked (the map's `route` says what it became)."""
        return self.model_dump(exclude={"source_map"}) | {"stabilize": self.stabilizes}

    @classmethod
    def from_parameters(
        cls, parameters: dict[str, Any] | None, where: str = "recipe"
    ) -> "NerOptions":
        return super().from_parameters(parameters, where, "parameters")


class NerModelOptions(_Options):
    """Options of one fine-tuned model, under its `models:` entry's `parameters:`."""

    exclude: str | None = Field(
        default=None,
        description="Comma-separated globs of output tensor names this model may "
        "not supply (it is still scored, for the report); '*' excludes it from "
        "every tensor. Each must match a tensor.",
    )

    _check_exclude = field_validator("exclude")(_check_patterns)


def unknown_key_problem(key: str, known: Sequence[str], what: str) -> str:
    """`what`, the nearest known key and all of them: a typo's fix is in the message."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{what} ({hint}known: {', '.join(known)})"


def validation_problems(
    error: ValidationError, prefix: str | None = None, known: Sequence[str] = ()
) -> list[str]:
    """One `field: problem (got value)` line per problem of a pydantic error.

    known: the model's field names; an extra key's line then lists them instead
    of pydantic's bare "Extra inputs are not permitted".
    """
    lines = []
    for problem in error.errors():
        location = (prefix, *problem["loc"]) if prefix else problem["loc"]
        field = ".".join(str(part) for part in location) or "(top level)"
        if known and problem["type"] == "extra_forbidden":
            name = str(problem["loc"][-1])
            lines.append(
                f"{field}: {unknown_key_problem(name, known, 'unknown option')}"
            )
            continue
        message = problem["msg"]
        if problem["type"] == "value_error":  # ours: no "Value error, " prefix
            message = str(problem["ctx"]["error"])
        given = repr(problem.get("input"))
        if len(given) > MAX_SHOWN_INPUT:
            given = given[:MAX_SHOWN_INPUT] + "..."
        quoted = problem["loc"] and problem["type"] != "missing"
        shown = f" (got {given})" if quoted else ""
        lines.append(f"{field}: {message}{shown}")
    return lines


def format_validation_error(
    error: ValidationError, where: str, what: str, prefix: str | None = None
) -> str:
    """One line per problem, each naming the file and the dotted field."""
    lines = [f"{where}: invalid {what}:"]
    lines += [f"  {line}" for line in validation_problems(error, prefix)]
    return "\n".join(lines)


# fast: float32 scores with bounds, float64 for near ties; exact: float64 only;
# nerd: the reference tool's own float32 rule (`compat: nerd`).
RouteName = Literal["fast", "exact", "nerd"]


class ScoringRoute(BaseModel):
    """How a plan computed its scores, and why that way: option `scoring` as
    resolved (`auto` picks by the device: see
    `ner_merge.scoring.streamed.scoring_route`), recorded in the source map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scoring: RouteName
    reason: str
