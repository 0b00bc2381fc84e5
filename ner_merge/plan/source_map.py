"""The source map: which model every output tensor comes from, and why.

The planner writes it, the merge method reads it, and a user may edit it by hand
(to override one tensor's source, say). It is JSON with sorted keys and no
timestamps, so the same inputs give the same bytes and diffs stay readable.

It stores decisions only: what a block or layer chose as one (its source and mean
scores) is derived from its tensors (`ner_merge.plan.selection.unit_decisions`), so it
cannot go stale when a tensor is edited. Older maps are read and upgraded:
version 1 stored those units and said what a tensor follows in one bare string;
version 2 had exact scores only (no bounds); version 3 did not record which
scoring route ran and why (`route`), only option `scoring` as resolved.
"""

import json
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ner_merge.errors import SourceMapError
from ner_merge.recipe.options import ScoringRoute, format_validation_error

if TYPE_CHECKING:  # its module imports mergekit and transformers; `show` needs neither
    from ner_merge.models.resolve import ResolvedModel

FORMAT_VERSION = 4
SOURCE_MAP_FILE = "ner_source_map.json"  # its name in a merge's output folder

Role = Literal["base", "fine-tuned"]
# highest-ner: a scored tensor, won outright; highest-mean-ner: a scored tensor
# whose unit (block or layer, see names.py) won by mean NER; follows: a tensor
# that goes with a matrix, unit or layer (biases, norms); base: not scored, copied
# from the base (non-float buffers); keep-base: matched by the keep_base option;
# override: set by hand in an edited map.
Rule = Literal[
    "highest-ner", "highest-mean-ner", "follows", "base", "keep-base", "override"
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoraPart(_Frozen):
    """The base or the adapter of a LoRA fine-tune, as named and as found."""

    name: str = Field(description="As the recipe gives it (either side of `+`).")
    path: str = Field(description="The local folder it was read from.")
    revision: str | None = Field(description="Hub commit; null for a folder.")


class LoraSource(_Frozen):
    """What a LoRA fine-tune (`model: BASE+ADAPTER`) was merged from."""

    base: LoraPart
    adapter: LoraPart
    adapter_hash: str = Field(description="BLAKE3 over the adapter's files.")


def lora_source(model: "ResolvedModel") -> LoraSource | None:
    """A LoRA fine-tune's base and adapter, as a source map records them."""
    if model.base is None or model.adapter is None:
        return None
    adapter = model.adapter
    return LoraSource(
        base=LoraPart(
            name=model.base.name, path=model.base.path, revision=model.base.revision
        ),
        adapter=LoraPart(
            name=adapter.name, path=adapter.path, revision=adapter.revision
        ),
        adapter_hash=adapter.hash,
    )


class ModelEntry(_Frozen):
    """One candidate model, as the recipe names it and as it was found."""

    name: str = Field(description="The model as the recipe gives it.")
    path: str = Field(description="The local folder its weights were read from.")
    revision: str | None = Field(description="Hub commit; null for a folder.")
    fingerprint: str = Field(
        description="Hash over every tensor's content hash (see content.py)."
    )
    role: Role
    exclude: tuple[str, ...] = Field(
        default=(), description="The model's `exclude` patterns when planned."
    )
    lora: LoraSource | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="For a LoRA fine-tune: its base and adapter, which mergekit "
        "merged into the folder `path`; absent for any other model.",
    )


class Follows(_Frozen):
    """What a tensor with rule `follows` goes with."""

    kind: Literal["tensor", "unit", "layer", "non-layer"] = Field(
        description="`tensor`: the scored tensor of its parent module (a bias "
        "follows its weight); `unit`: its block or layer; `layer`: the model "
        "supplying most of its decoder layer's scored values; `non-layer`: the "
        "same over the scored tensors outside the layers."
    )
    name: str | None = Field(
        default=None, description="The tensor or unit followed (kinds tensor, unit)."
    )


class TensorChoice(_Frozen):
    """The chosen source of one output tensor."""

    source: str = Field(description="Name of the model the tensor is copied from.")
    rule: Rule
    layer: int | None = Field(description="Decoder layer index; null outside layers.")
    shape: tuple[int, ...]
    scores: dict[str, float | None] = Field(
        default_factory=dict,
        description="NER of each model's tensor, if scored; null: NaN or Inf.",
    )
    bounds: dict[str, float] = Field(
        default_factory=dict,
        description="For each score computed in float32: how far it may lie from "
        "the exact (float64) score of that copy. A scored model not listed has its "
        "exact score.",
    )
    refined: bool = Field(
        default=False,
        description="The float32 scores left this tensor's decision in doubt (a "
        "near tie), so the copies that could win were scored exactly.",
    )
    follows: Follows | None = Field(
        default=None, description="For rule 'follows': what it goes with."
    )
    unit: str | None = Field(
        default=None,
        description="The block or layer it chose its source with "
        "(granularity module or layer).",
    )
    excluded: tuple[str, ...] = Field(
        default=(),
        description="Models that may not supply it: excluded by their `exclude` "
        "option, or (with `nonfinite: lose`) holding NaN or Inf in it or in a "
        "tensor that chooses with it.",
    )
    stabilized: float | None = Field(
        default=None,
        description="Share of values the stabilize stage took from the base. When "
        "set, the tensor is NOT bit-identical to its source.",
    )


class UnitChoice(_Frozen):
    """A block or layer that chose its source as one (granularity module/layer)."""

    source: str = Field(description="The model supplying most of its values.")
    scores: dict[str, float | None] = Field(
        description="Each model's mean score over the unit's scored tensors; "
        "null if one of them is NaN or Inf."
    )


class SourceMap(_Frozen):
    """Every output tensor's source, plus what the choice was made from."""

    format_version: Literal[4] = FORMAT_VERSION
    models: tuple[ModelEntry, ...]
    options: dict[str, object] = Field(description="The NER options used to plan.")
    route: ScoringRoute | None = Field(
        default=None,
        description="The scoring route the plan took and why; null in a map "
        "made otherwise than by a plan.",
    )
    tensors: dict[str, TensorChoice]

    @model_validator(mode="after")
    def _sources_are_known_models(self) -> "SourceMap":
        names = [model.name for model in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models are listed twice: {names}")
        if [m.role for m in self.models].count("base") != 1:
            raise ValueError("exactly one model must have role 'base'")
        for name, choice in self.tensors.items():
            unknown = {choice.source, *choice.scores, *choice.excluded} - set(names)
            if unknown:
                raise ValueError(
                    f"{name} names unknown model(s) {sorted(unknown)}; known: {names}"
                )
            unscored = set(choice.bounds) - set(choice.scores)
            if unscored:
                raise ValueError(
                    f"{name} has bounds for models it has no score of: "
                    f"{sorted(unscored)}"
                )
            if not all(0 <= bound < math.inf for bound in choice.bounds.values()):
                raise ValueError(f"{name}: each bound must be a number, 0 or more")
        return self

    @property
    def base(self) -> ModelEntry:
        return next(model for model in self.models if model.role == "base")

    def model(self, name: str) -> ModelEntry:
        return next(model for model in self.models if model.name == name)

    def renamed(self, names: dict[str, str]) -> "SourceMap":
        """The same map with models renamed (old name: new name) wherever one is
        named: its entry, and each tensor's source, scores and exclusions. Names
        left out stay; two models must not end up as one."""

        def rename(name: str) -> str:
            return names.get(name, name)

        def keyed(given: dict[str, object]) -> dict[str, object]:
            return {rename(model): value for model, value in given.items()}

        tensors = {
            name: choice.model_copy(
                update={
                    "source": rename(choice.source),
                    "scores": keyed(choice.scores),
                    "bounds": keyed(choice.bounds),
                    "excluded": tuple(rename(model) for model in choice.excluded),
                }
            )
            for name, choice in self.tensors.items()
        }
        models = tuple(
            model.model_copy(update={"name": rename(model.name)})
            for model in self.models
        )
        return self.model_copy(update={"models": models, "tensors": tensors})

    def share_by_model(self) -> dict[str, int]:
        """How many output tensors each model supplies (all models listed)."""
        counts = Counter(choice.source for choice in self.tensors.values())
        return {model.name: counts[model.name] for model in self.models}

    def to_json(self) -> str:
        document = self.model_dump(mode="json")
        return json.dumps(document, indent=1, sort_keys=True, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "SourceMap":
        """Read and validate a map; every problem names the file and the field.

        Parsing is strict, as a hand-edited file deserves: a key given twice, a
        NaN or Infinity literal, or a score written as a string or a boolean is
        refused, never silently taken.
        """
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise SourceMapError(
                f"{where}: cannot read source map: {error.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise SourceMapError(not_a_map(where, "not text")) from None
        if not text.lstrip().startswith("{"):  # a map's first character
            raise SourceMapError(not_a_map(where, "not a JSON object"))
        try:
            document = json.loads(
                text, object_pairs_hook=_unique_keys, parse_constant=_no_constant
            )
        except json.JSONDecodeError as error:
            raise SourceMapError(f"{where}: not valid JSON: {error}") from None
        except ValueError as error:  # from the two hooks
            raise SourceMapError(f"{where}: {error}") from None
        if not {"format_version", "tensors"} & set(document):
            raise SourceMapError(not_a_map(where, "no format_version, no tensors"))
        if document.get("format_version") in (1, 2, 3):
            text = json.dumps(_upgraded(document))
        try:
            return cls.model_validate_json(text, strict=True)
        except ValidationError as error:
            raise SourceMapError(
                format_validation_error(error, where, "source map")
            ) from None


def _upgraded(document: dict) -> dict:
    """A version 1, 2 or 3 map as version 4. Version 1: units dropped (they are
    derived now), each `follows` string told apart by what it names. Versions 1
    and 2: every score was exact, which option `scoring` now records (no bounds
    are needed). All three: the route is what option `scoring` (as resolved then)
    or `compat` says (none if neither says); why, these maps did not record."""
    tensors = document.get("tensors")
    options = document.get("options")
    version = document.get("format_version")
    if not isinstance(tensors, dict) or not isinstance(options, dict):
        return document  # validation will say what is wrong
    upgraded = {}
    for name, choice in tensors.items():
        if isinstance(choice, dict) and isinstance(choice.get("follows"), str):
            choice = dict(choice, follows=_v1_follows(choice["follows"], tensors))
        upgraded[name] = choice
    nerd = options.get("compat") == "nerd"  # NERD's scores have a rule of their own
    if version in (1, 2) and not nerd:
        options = options | {"scoring": "exact"}
    route = "nerd" if nerd else options.get("scoring")
    reason = f"a format {version} map, which does not record why"
    rest = {key: value for key, value in document.items() if key != "units"}
    return rest | {
        "format_version": FORMAT_VERSION,
        "options": options,
        "route": {"scoring": route, "reason": reason} if route else None,
        "tensors": upgraded,
    }


def _v1_follows(follows: str, tensors: dict) -> dict:
    """A version 1 `follows` string as a `Follows`: a tensor's name, "layer N",
    "non-layer matrices", or else a unit's name."""
    if follows in tensors:
        return {"kind": "tensor", "name": follows}
    if follows == "non-layer matrices":
        return {"kind": "non-layer"}
    if follows.startswith("layer ") and follows[6:].isdigit():
        return {"kind": "layer"}
    return {"kind": "unit", "name": follows}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    counts = Counter(key for key, _ in pairs)
    repeated = sorted(key for key, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(f"key(s) given twice in one object: {repeated}")
    return dict(pairs)


def _no_constant(literal: str) -> None:
    raise ValueError(f"{literal} is not a number JSON allows (a score is a number)")


@lru_cache(maxsize=4)
def not_a_map(where: str, why: str) -> str:
    """The one line for a file that is no source map at all (a config.json, a
    model card): no field of it is worth listing."""
    return (
        f"{where}: not a source map ({why}); give a map from `ner-merge plan -o`, "
        f"or a merge's {SOURCE_MAP_FILE}"
    )


def load_cached(path: str, modified_ns: int) -> SourceMap:
    """Load a map once per merge: the method asks for it for every tensor."""
    return SourceMap.load(path)
