"""The NER planner: score every weight matrix of every model, pick each tensor's source.

Reading is streamed: one tensor of one model at a time, read into its own buffer
(`ner_merge.reader`), so planning a 7B trio holds one matrix and its Gram matrix,
never a model (token-indexed tensors under a tokenizer option are the exception:
mergekit aligns all models' copies together, see vocabulary.py). Scores already
in the score cache (`ner_merge.cache`) are neither read nor computed again.

The rules are in RULES below, in one place, and the report quotes them.
Tensor names come from mergekit's architecture tables: no family is hard-coded.
"""

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from math import prod

import torch
import tqdm
from mergekit.architecture import ModelArchitecture, get_architecture_info
from mergekit.architecture.base import ConfiguredModuleArchitecture, WeightInfo
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from ner_merge.cache import ScoreCache, default_cache_dir
from ner_merge.errors import ModelError, NerMergeError, RecipeError
from ner_merge.models import ResolvedModel, resolve_model
from ner_merge.ner import NonFiniteMatrixError, normalized_effective_rank
from ner_merge.nerd import nerd_score, scores_like_nerd, stabilize
from ner_merge.options import Granularity, split_patterns
from ner_merge.reader import DTYPES
from ner_merge.recipe import Recipe
from ner_merge.source_map import ModelEntry, SourceMap, TensorChoice, UnitChoice
from ner_merge.units import unit_of
from ner_merge.vocabulary import FIX_HINT, VocabularyAlignment, vocabulary_alignment

LOG = logging.getLogger(__name__)

RULES = """\
- a 2-D floating-point weight is a *matrix*, and matrices are the *scored*
  tensors: each goes to the model whose copy has the highest NER; on equal scores
  the earlier candidate wins (base first, then the fine-tuned models in recipe
  order);
- a tensor that shares its module with a scored tensor (`X.bias` beside a 2-D
  `X.weight`) follows it, so a projection stays whole;
- with `granularity: module`, the scored tensors of each block of a decoder layer
  (a child module of the layer, such as `self_attn` or `mlp`) go together to the
  model with the highest mean score over them, and the block's other tensors
  follow; with `granularity: layer` the same holds for the whole layer, norms
  included. Outside the layers (embeddings, lm_head, final norm) every
  granularity chooses tensor by tensor;
- any other floating-point tensor (a norm's scale) follows its decoder layer: it
  comes from the model that supplies most of that layer's scored parameters
  (outside the layers: most of the scored tensors outside the layers), ties again
  by candidate order, because a norm rescales the inputs of the matrices around it;
- non-floating-point tensors (integer buffers), and optional tensors that some
  models lack, come from the base;
- `keep_base`: a tensor whose name matches comes from the base, and so does
  everything that chooses with it (its module, its unit);
- a model's `exclude`: it never supplies a matching tensor, nor anything that
  chooses with one; the base is always eligible;
- `compat: nerd` scores as the reference tool NERD does: every 1-D or 2-D
  `.weight` (norms, embeddings and lm_head included) by the NER of its min-max
  scaled bfloat16 copy (a 1-D weight by the entropy of its values);
- `stabilize: true`: in every tensor not taken from the base, the base's value is
  put back where |base| >= |chosen| and |base| < median(|chosen|); the share of
  base values is recorded per tensor, and such tensors are not bit-identical to
  their source.
"""

FLOAT_DTYPES = {name for name, dtype in DTYPES.items() if dtype.is_floating_point}


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model, and what each candidate stores for it."""

    name: str
    layer: int | None
    shape: tuple[int, ...]
    is_float: bool
    # Per candidate: the name in its files (an alias, say); None where it lacks it.
    stored_names: tuple[str | None, ...]
    aligned_axis: int | None = None  # token axis mergekit re-indexes (vocabulary.py)
    base_only: bool = False  # an optional tensor some models lack: from the base

    @property
    def is_matrix(self) -> bool:
        return self.is_float and len(self.shape) == 2

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


def localized_config(recipe: Recipe, models: list[ResolvedModel]) -> MergeConfiguration:
    """The recipe's configuration with every model replaced by its local folder.

    mergekit then reads exactly the files that were planned (the resolved Hub
    commit, not whatever is newest) and never asks the Hub again.
    """
    local = {
        ref: ModelReference.parse(m.path) for ref, m in zip(recipe.candidates(), models)
    }
    return recipe.config.model_copy(
        update={
            "base_model": local[recipe.config.base_model],
            "models": [
                model.model_copy(update={"model": local[model.model]})
                for model in recipe.config.models or []
            ],
        }
    )


def resolve_models(recipe: Recipe) -> list[ResolvedModel]:
    """Resolve every candidate, read each one's index and headers up front, and
    refuse one model given twice under two names."""
    models = [resolve_model(reference) for reference in recipe.candidates()]
    _refuse_one_folder_twice(models, recipe.where)
    for model in models:  # fail now, naming the model, not mid-plan
        model.headers  # noqa: B018
        model.config  # noqa: B018
    for index, first in enumerate(models):
        for second in models[index + 1 :]:
            if same_content(first, second):
                raise ModelError(
                    f"{recipe.where}: models {first.name} and {second.name} hold "
                    "the same weights (every tensor identical); list each model once"
                )
    return models


def _refuse_one_folder_twice(models: list[ResolvedModel], where: str) -> None:
    """Two spellings of one folder (`x/sea`, `x/../models/sea`, a symbolic link,
    `org/name` and `org/name@main`) would be scored twice and then refused by
    mergekit ("Duplicate merge inputs") only once the plan is done."""
    seen: dict[str, ResolvedModel] = {}
    for model in models:
        real = os.path.realpath(model.path)
        if real in seen:
            raise ModelError(
                f"{where}: models {seen[real].name} and {model.name} are one folder "
                f"({real}); list each model once"
            )
        seen[real] = model


def same_content(first: ResolvedModel, second: ResolvedModel) -> bool:
    """Whether two models hold the same tensors byte for byte (equal content
    fingerprints), reading as little as possible.

    Fingerprints would read every tensor of a model not yet indexed before the
    plan starts. Distinct models of one family differ somewhere, almost always
    already in a norm or a bias, so tensors are compared smallest first and the
    first difference ends it; the digests read are kept for the plan.
    """
    layout = {name: (h.dtype, h.shape) for name, h in first.headers.items()}
    if layout != {name: (h.dtype, h.shape) for name, h in second.headers.items()}:
        return False
    for name in sorted(layout, key=lambda n: (prod(layout[n][1]), n)):
        if _tensor_hash(first, name) != _tensor_hash(second, name):
            return False
    return True


def _tensor_hash(model: ResolvedModel, name: str) -> str:
    """A stored tensor's content hash, read (and kept) if not yet known."""
    if model.content.known(name) is None:
        model.content.read(name)
    return model.content.known(name).hash


def check_device(merge_options: MergeOptions) -> None:
    """Refuse a scoring device torch cannot compute on, before any model is read.

    mergekit's --cuda without CUDA, or a device with no kernels (`meta`), would
    otherwise fail at the first matrix scored, or pass unnoticed when every score
    is cached. Scoring a 2 x 2 identity there is the test: it allocates, runs the
    kernel's float64 arithmetic and copies a number back.
    """
    device = merge_options.device
    cuda = merge_options.cuda and device == "cuda"
    option = "--cuda" if cuda else f"--device {device}"
    try:
        normalized_effective_rank(torch.eye(2), device)
    except Exception as error:  # torch raises many kinds for a bad device
        reason = next(iter(str(error).strip().splitlines()), "")  # first line only
        raise NerMergeError(
            f"{option}: torch cannot score on this device "
            f"({type(error).__name__}: {reason})"
        ) from None


def output_tensors(
    config: MergeConfiguration,
    models: list[ResolvedModel],
    merge_options: MergeOptions,
    vocabulary: VocabularyAlignment | None = None,
) -> list[OutputTensor]:
    """Every tensor of the output, in architecture order, checked across models.

    All missing tensors, shape mismatches and layer-count differences are
    collected and reported together, so one run shows everything to fix. With a
    tokenizer option (`vocabulary`), token-indexed tensors may differ along
    their token axis: mergekit aligns them to the output vocabulary.
    """
    try:
        architecture = get_architecture_info(config, merge_options)
    except Exception as error:  # mergekit raises bare RuntimeErrors here
        raise ModelError(
            f"cannot determine the models' architecture: {error}"
        ) from None
    problems: list[str] = []
    tensors: list[OutputTensor] = []
    for info, layer in _architecture_weights(architecture, config, models, problems):
        tensor = _check_tensor(info, layer, models, vocabulary, problems)
        if tensor is not None:
            tensors.append(tensor)
    if problems:
        raise ModelError("the models do not match:\n  " + "\n  ".join(problems))
    LOG.debug("%d output tensors", len(tensors))
    return tensors


def _architecture_weights(
    architecture: ModelArchitecture,
    config: MergeConfiguration,
    models: list[ResolvedModel],
    problems: list[str],
) -> list[tuple[WeightInfo, int | None]]:
    """(weight, layer index) pairs from mergekit's tables for the base config."""
    configs = [model.config for model in models]
    weights = []
    for module in architecture.modules.values():
        configured = ConfiguredModuleArchitecture(
            info=module.architecture,
            config=configs[0],
            weight_prefix=module.weight_prefix,
        )
        layer_counts = [module.architecture.num_layers(c) for c in configs]
        if len(set(layer_counts)) > 1:
            counts = ", ".join(f"{m.name}: {n}" for m, n in zip(models, layer_counts))
            problems.append(f"layer counts differ ({counts})")
        weights += [(w, None) for w in configured.pre_weights()]
        for layer in range(configured.num_layers()):
            weights += [(w, layer) for w in configured.layer_weights(layer)]
        weights += [(w, None) for w in configured.post_weights()]
    return weights


def _check_tensor(
    info: WeightInfo,
    layer: int | None,
    models: list[ResolvedModel],
    vocabulary: VocabularyAlignment | None,
    problems: list[str],
) -> OutputTensor | None:
    """Find one weight in every model; None for an optional weight nobody stores."""
    own_names = [info.name, *(info.aliases or ())]
    if info.optional and not any(n in m.headers for m in models for n in own_names):
        return None  # e.g. a tied lm_head: mergekit skips it too
    candidates = own_names + list(info.tied_names or ())
    stored = [next((n for n in candidates if n in m.headers), None) for m in models]
    lacking = [model for model, name in zip(models, stored) if name is None]
    if lacking and not (info.optional and stored[0] is not None):
        problems += [
            f"tensor {info.name}: missing from {m.name} ({m.path})" for m in lacking
        ]
        return None
    # An optional tensor only some models store (a buffer newer savers drop):
    # mergekit passes the method the copies that exist, and the base has one.
    headers = [m.headers[name] for m, name in zip(models, stored) if name is not None]
    shape = headers[0].shape
    axis = info.vocabulary_axis if vocabulary is not None else None
    if axis is not None:  # only the other axes must agree; mergekit aligns this one
        shape = (*shape[:axis], vocabulary.size, *shape[axis + 1 :])
    if len({_without(h.shape, axis) for h in headers}) > 1:
        listed = ", ".join(
            f"{m.name}: {list(h.shape)}" for m, h in zip(models, headers)
        )
        problem = f"tensor {info.name}: shapes differ ({listed})"
        if info.vocabulary_axis is not None and axis is None:
            problem += f": {FIX_HINT}"
        problems.append(problem)
        return None
    return OutputTensor(
        name=info.name,
        layer=layer,
        shape=shape,
        is_float=all(header.dtype in FLOAT_DTYPES for header in headers),
        stored_names=tuple(stored),
        aligned_axis=axis,
        base_only=bool(lacking),
    )


def _without(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    return shape if axis is None else shape[:axis] + shape[axis + 1 :]


@dataclass(frozen=True)
class Scoring:
    """Which output tensors are scored, and how (the spec's NER or NERD's)."""

    name: str
    selects: Callable[[OutputTensor], bool]
    score: Callable[[torch.Tensor], float]


SPEC_SCORING = Scoring("ner", lambda t: t.is_matrix, normalized_effective_rank)
NERD_SCORING = Scoring(
    "nerd", lambda t: t.is_float and scores_like_nerd(t.name, t.shape), nerd_score
)


class CopyReader:
    """Every model's copy of an output tensor, as mergekit will hand it over.

    Plain tensors are read one model at a time, each into a buffer of its own
    (`ner_merge.reader`). Token-indexed tensors under a tokenizer option are read
    together and aligned by mergekit's own code.
    """

    def __init__(
        self, models: list[ResolvedModel], vocabulary: VocabularyAlignment | None
    ):
        self.models = models
        self.references = [ModelReference.parse(m.path) for m in models]
        self.vocabulary = vocabulary

    def is_aligned(self, tensor: OutputTensor) -> bool:
        """True when a copy depends on every model's vocabulary, not its own file."""
        return tensor.aligned_axis is not None and self.vocabulary is not None

    def copies(
        self, tensor: OutputTensor, dtype: torch.dtype | None = None
    ) -> Iterator[torch.Tensor]:
        """Each candidate's copy in candidate order, cast to `dtype` if given."""
        raw = (self.copy(tensor, index) for index in range(len(self.models)))
        cast = (x if dtype is None else x.to(dtype) for x in raw)
        if not self.is_aligned(tensor):
            yield from cast
            return
        aligned = self.vocabulary.align(
            tensor.name, tensor.aligned_axis, dict(zip(self.references, cast))
        )
        yield from (aligned[reference] for reference in self.references)

    def copy(self, tensor: OutputTensor, index: int) -> torch.Tensor:
        """Candidate `index`'s copy as stored (not aligned); its digest is kept."""
        return self.models[index].content.read(tensor.stored_names[index])


def score_matrices(
    tensors: list[OutputTensor],
    models: list[ResolvedModel],
    reader: CopyReader,
    scoring: Scoring = SPEC_SCORING,
    nonfinite: str = "error",
    quiet: bool = False,
    cache: ScoreCache | None = None,
    device: str | None = None,
) -> dict[str, list[float | None]]:
    """Every model's score of every given tensor, streamed one tensor at a time.

    A copy holding NaN or Inf stops the plan, naming model and tensor, unless
    `nonfinite` is "lose": then its score is None, which loses to any number.
    The cache is keyed on each copy's content hash: a copy whose hash is known
    (its file is indexed) and scored is not even read; a copy read for its hash
    may still find its score (another model stores the same bytes). Each new
    score is stored at once, so an interrupted plan keeps its work. Aligned
    copies (`CopyReader.is_aligned`) depend on every model's vocabulary at once,
    so they bypass the cache. Scoring runs on `device` (mergekit's --device).
    """
    scores: dict[str, list[float | None]] = {}
    progress = tqdm.tqdm(
        total=len(tensors) * len(models),
        desc="NER scoring",
        unit="tensor",
        disable=quiet,
    )
    with progress:
        for tensor in tensors:
            aligned = reader.copies(tensor) if reader.is_aligned(tensor) else None
            usable = None if aligned else cache
            row = []
            for index, (model, stored) in enumerate(zip(models, tensor.stored_names)):
                known = model.content.known(stored)
                score = usable.get(known.hash) if usable and known else None
                if score is None:
                    copy = next(aligned) if aligned else reader.copy(tensor, index)
                    tensor_hash = model.content.known(stored).hash
                    if usable and not known:  # another model's identical copy?
                        score = usable.get(tensor_hash)
                    if score is None:
                        where = f"model {model.name}: tensor {stored}"
                        score = _score(copy, scoring, device, nonfinite, where)
                        if usable and score is not None:
                            usable.put(tensor_hash, score)
                    del copy
                row.append(score)
                progress.update()
            scores[tensor.name] = row
    return scores


def _score(
    copy: torch.Tensor, scoring: Scoring, device: str | None, nonfinite: str, where: str
) -> float | None:
    """One copy's score; None for a non-finite copy when `nonfinite` is "lose"."""
    try:
        return scoring.score(copy.to(device) if device else copy)
    except NonFiniteMatrixError:
        if nonfinite != "lose":
            raise ModelError(
                f"{where} holds NaN or Inf values (set `nonfinite: lose` to let "
                "such copies lose instead)"
            ) from None
        LOG.warning("%s holds NaN or Inf; it loses this tensor", where)
        return None


def nonfinite_copies(
    tensors: list[OutputTensor], models: list[ResolvedModel]
) -> dict[str, list[bool]]:
    """Per floating-point tensor with a NaN or Inf anywhere: which copies hold one.

    Copies not yet read are read (a norm, a bias: small), so a bad value in a
    tensor that no rule scores is found too, and before any scoring when asked
    for the unscored tensors first.
    """
    found = {}
    for tensor in tensors:
        if tensor.is_float:
            flags = [
                stored is not None and not model.content.finite(stored)
                for model, stored in zip(models, tensor.stored_names)
            ]
            if any(flags):
                found[tensor.name] = flags
    return found


def check_finite(
    nonfinite: dict[str, list[bool]], tensors: list[OutputTensor], names: list[str]
) -> None:
    """Refuse (`nonfinite: error`) naming every copy that holds NaN or Inf."""
    stored = {tensor.name: tensor.stored_names for tensor in tensors}
    problems = [
        f"model {model}: tensor {stored[name][index]} holds NaN or Inf values"
        for name, flags in nonfinite.items()
        for index, model in enumerate(names)
        if flags[index]
    ]
    if problems:
        raise ModelError(
            "\n  ".join(problems)
            + "\n(set `nonfinite: lose` to let such copies lose instead)"
        )


def first_best(
    values: list[float | None], eligible: list[bool] | None = None
) -> int | None:
    """Index of the largest eligible value, the earliest on ties (the tie rule).

    None (a copy that could not be scored) loses to any number, and so does an
    ineligible model (see `exclude`); None if no value is left.
    """
    best = None
    for index, value in enumerate(values):
        if value is None or (eligible is not None and not eligible[index]):
            continue
        if best is None or value > values[best]:
            best = index
    return best


@dataclass(frozen=True)
class Selection:
    """The recipe's selection options: what chooses together, and who may win."""

    granularity: Granularity = "tensor"
    keep_base: tuple[str, ...] = ()
    exclusions: tuple[tuple[str, ...], ...] = ()  # per candidate, base first

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "Selection":
        return cls(
            granularity=recipe.options.granularity,
            keep_base=split_patterns(recipe.options.keep_base),
            exclusions=recipe.exclusions,
        )

    def kept(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.keep_base)

    def eligible(self, name: str, count: int) -> list[bool]:
        """Per candidate: may it supply this tensor? The base always may."""
        patterns = list(self.exclusions) + [()] * (count - len(self.exclusions))
        return [
            index == 0 or not any(fnmatchcase(name, p) for p in patterns[index])
            for index in range(count)
        ]

    def check_patterns(self, tensors: list[str], models: list[str], where: str):
        """Every pattern must match some tensor: one that matches none is a typo."""
        options = [("parameters.keep_base", self.keep_base)] + [
            (f"parameters.exclude of model {model}", patterns)
            for model, patterns in zip(models, self.exclusions)
        ]
        for option, patterns in options:
            for pattern in patterns:
                if not any(fnmatchcase(name, pattern) for name in tensors):
                    raise RecipeError(
                        f"{where}: {option}: pattern {pattern!r} matches no tensor "
                        f"of these models (their names run from {tensors[0]} to "
                        f"{tensors[-1]})"
                    )


@dataclass
class _Group:
    """Tensors that take one source together: a scored tensor or a unit, plus
    the tensors that go with it."""

    unit: str | None  # block or layer name; None for a tensor choosing alone
    scored: list[OutputTensor] = field(default_factory=list)
    followers: list[tuple[OutputTensor, str]] = field(default_factory=list)

    def members(self) -> list[OutputTensor]:
        return self.scored + [tensor for tensor, _ in self.followers]


def group_tensors(
    tensors: list[OutputTensor], selection: Selection, scoring: Scoring
) -> tuple[dict[str, _Group], list[OutputTensor]]:
    """Groups that choose as one, and the float tensors left to the layer rule."""
    groups: dict[str, _Group] = {}
    leaders: dict[str, str] = {}  # module -> key of the group of its scored tensor
    for tensor in tensors:
        if scoring.selects(tensor) and not tensor.base_only:
            unit = unit_of(tensor.name, tensor.layer, selection.granularity)
            key = unit or tensor.name
            groups.setdefault(key, _Group(unit)).scored.append(tensor)
            leaders[tensor.module] = key
    rest = []
    for tensor in tensors:
        if scoring.selects(tensor) or not tensor.is_float or tensor.base_only:
            continue
        unit = unit_of(tensor.name, tensor.layer, selection.granularity)
        if tensor.module in leaders:
            group = groups[leaders[tensor.module]]
            leader = next(t.name for t in group.scored if t.module == tensor.module)
            group.followers.append((tensor, leader))
        elif unit in groups:
            groups[unit].followers.append((tensor, unit))
        else:
            rest.append(tensor)
    return groups, rest


def choose_sources(
    tensors: list[OutputTensor],
    scores: dict[str, list[float | None]],
    names: list[str],
    selection: Selection = Selection(),
    scoring: Scoring = SPEC_SCORING,
    nonfinite: dict[str, list[bool]] | None = None,
) -> dict[str, TensorChoice]:
    """Apply RULES to scored tensors: the choice of every tensor.

    A copy in `nonfinite` (NaN or Inf, under `nonfinite: lose`) may not supply its
    tensor, nor anything that chooses with it; if no copy is left, that is an
    error naming the tensor.
    """
    nonfinite = nonfinite or {}

    def eligible(name: str) -> list[bool]:
        flags = selection.eligible(name, len(names))
        bad = nonfinite.get(name, [False] * len(names))
        return [ok and not holds_nan for ok, holds_nan in zip(flags, bad)]

    def from_base(tensor: OutputTensor, rule: str) -> TensorChoice:
        if nonfinite.get(tensor.name, [False])[0]:
            raise ModelError(
                f"tensor {tensor.name} must come from the base ({rule}), whose "
                f"copy holds NaN or Inf values"
            )
        return TensorChoice(
            source=names[0], rule=rule, layer=tensor.layer, shape=tensor.shape
        )

    groups, rest = group_tensors(tensors, selection, scoring)
    choices: dict[str, TensorChoice] = {}
    supplied: dict[int | None, Counter] = {}  # layer -> model index -> parameters
    for group in groups.values():
        members = group.members()
        if any(selection.kept(t.name) for t in members):
            for tensor in members:
                choices[tensor.name] = from_base(tensor, "keep-base")
            winner = 0
        else:
            allowed = [
                all(flags) for flags in zip(*(eligible(t.name) for t in members))
            ]
            means = [
                _mean([scores[t.name][i] for t in group.scored])
                for i in range(len(names))
            ]
            winner = first_best(means, allowed)
            if winner is None:
                raise ModelError(
                    f"{group.unit or group.scored[0].name}: no eligible model's "
                    "copy is finite"
                )
            excluded = tuple(n for n, ok in zip(names, allowed) if not ok)
            for tensor in group.scored:
                choices[tensor.name] = TensorChoice(
                    source=names[winner],
                    rule="highest-ner" if group.unit is None else "highest-mean-ner",
                    unit=group.unit,
                    layer=tensor.layer,
                    shape=tensor.shape,
                    scores=dict(zip(names, scores[tensor.name])),
                    excluded=excluded,
                )
            for tensor, leader in group.followers:
                choices[tensor.name] = TensorChoice(
                    source=names[winner],
                    rule="follows",
                    follows=leader,
                    layer=tensor.layer,
                    shape=tensor.shape,
                    excluded=excluded,
                )
        for tensor in group.scored:
            supplied.setdefault(tensor.layer, Counter())[winner] += prod(tensor.shape)
    for tensor in rest:
        if selection.kept(tensor.name):
            choices[tensor.name] = from_base(tensor, "keep-base")
            continue
        allowed = eligible(tensor.name)
        counts = supplied.get(tensor.layer, Counter())
        winner = first_best([counts[i] for i in range(len(names))], allowed)
        if winner is None:
            raise ModelError(f"{tensor.name}: no eligible model's copy is finite")
        group = (
            "non-layer matrices" if tensor.layer is None else f"layer {tensor.layer}"
        )
        choices[tensor.name] = TensorChoice(
            source=names[winner],
            rule="follows",
            follows=group,
            excluded=tuple(n for n, ok in zip(names, allowed) if not ok),
            layer=tensor.layer,
            shape=tensor.shape,
        )
    for tensor in tensors:
        if not tensor.is_float or tensor.base_only:
            choices[tensor.name] = from_base(tensor, "base")
    return {tensor.name: choices[tensor.name] for tensor in tensors}


def unit_choices(
    choices: dict[str, TensorChoice], names: list[str]
) -> dict[str, UnitChoice]:
    """Each unit's source and per-model mean scores, from its tensors' choices."""
    members: dict[str, list[TensorChoice]] = {}
    for choice in choices.values():
        if choice.rule == "highest-mean-ner" and choice.unit is not None:
            members.setdefault(choice.unit, []).append(choice)
    return {
        unit: UnitChoice(
            source=scored[0].source,
            scores={
                name: _mean([choice.scores[name] for choice in scored])
                for name in names
            },
        )
        for unit, scored in members.items()
    }


def _mean(values: list[float | None]) -> float | None:
    """Mean score of a unit's copies from one model; None if any is not finite."""
    if any(value is None for value in values):
        return None
    return sum(values) / len(values)


def stabilized(
    tensors: list[OutputTensor],
    choices: dict[str, TensorChoice],
    reader: CopyReader,
    names: list[str],
    dtype: torch.dtype | None,
) -> dict[str, TensorChoice]:
    """Choices with the share of base values the stabilize stage puts back.

    Computed on the copies exactly as the merge method will see them (cast to the
    recipe's dtype, aligned), with the same function, so the map states what the
    merge writes.
    """
    result = dict(choices)
    for tensor in tensors:
        choice = choices[tensor.name]
        if not tensor.is_float or choice.source == names[0]:
            continue
        copies = list(reader.copies(tensor, dtype))
        _, from_base = stabilize(copies[0], copies[names.index(choice.source)])
        result[tensor.name] = choice.model_copy(
            update={"stabilized": from_base / copies[0].numel()}
        )
    return result


def plan(
    recipe: Recipe,
    merge_options: MergeOptions | None = None,
    quiet: bool = False,
    models: list[ResolvedModel] | None = None,
) -> SourceMap:
    """Score the recipe's models and return the source map of the merge."""
    merge_options = merge_options or MergeOptions()
    check_device(merge_options)
    models = models or resolve_models(recipe)
    config = localized_config(recipe, models)
    vocabulary = vocabulary_alignment(config, merge_options)
    tensors = output_tensors(config, models, merge_options, vocabulary)
    names = [model.name for model in models]
    selection = Selection.from_recipe(recipe)
    selection.check_patterns([t.name for t in tensors], names, recipe.where)
    scoring = NERD_SCORING if recipe.options.compat == "nerd" else SPEC_SCORING
    groups, _ = group_tensors(tensors, selection, scoring)
    to_score = [  # a group kept from the base needs no scores
        tensor
        for group in groups.values()
        if not any(selection.kept(t.name) for t in group.members())
        for tensor in group.scored
    ]
    # NaN or Inf in a tensor no rule scores (a norm, a bias) is found before any
    # scoring; in a scored copy, as it is scored; in the rest, after.
    scored_names = {tensor.name for tensor in to_score}
    unscored = [tensor for tensor in tensors if tensor.name not in scored_names]
    nonfinite = nonfinite_copies(unscored, models)
    if recipe.options.nonfinite == "error":
        check_finite(nonfinite, tensors, names)
    reader = CopyReader(models, vocabulary)
    cache_dir = default_cache_dir()
    scores = score_matrices(
        to_score,
        models,
        reader,
        scoring,
        recipe.options.nonfinite,
        quiet=quiet or merge_options.quiet,
        cache=ScoreCache(cache_dir, {"scoring": scoring.name}) if cache_dir else None,
        device=merge_options.device,
    )
    nonfinite = nonfinite_copies(tensors, models)
    choices = choose_sources(tensors, scores, names, selection, scoring, nonfinite)
    if recipe.options.stabilize:
        dtype = dtype_from_name(config.dtype) if config.dtype else None
        choices = stabilized(tensors, choices, reader, names, dtype)
    return SourceMap(
        models=tuple(
            ModelEntry(
                name=model.name,
                path=model.path,
                revision=model.revision,
                fingerprint=model.content.fingerprint,
                role="base" if index == 0 else "fine-tuned",
                exclude=recipe.exclusions[index] if recipe.exclusions else (),
            )
            for index, model in enumerate(models)
        ),
        options=recipe.options.model_dump(exclude={"source_map"}),
        tensors=choices,
        units=unit_choices(choices, names),
    )
