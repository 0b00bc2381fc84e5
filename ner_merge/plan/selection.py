"""Selection: which model each output tensor comes from. The rules live here only.

Everything else derives from this module's decisions: the planner feeds it
scores, a hand-edited map is reconciled by running it again with the edits
pinned, and the report quotes RULES. It imports neither torch nor mergekit, so
the rules can be read, and tested on made-up tensor lists, on their own.

Three steps:
1. `group_tensors`: the output tensors become groups that choose as one (a scored
   tensor, or a block or layer at granularity module/layer) with the tensors that
   go with them; the keep_base and exclude decisions are made here, once.
2. `choose`: each group's winner, from its scores, then the followers of every
   group and of every layer's majority, from the final sources. Scores computed
   in float32 carry bounds: `uncertain_copies` says which copies must be scored
   exactly first, so that every winner is the one exact scores pick.
3. `reconcile`: a hand-edited map's changed sources are pinned and `choose` runs
   again, so followers move with what they follow and rules say `override`.
"""

import sys
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from math import prod

from ner_merge.errors import RecipeError, SourceMapError
from ner_merge.models.names import Granularity, parent, unit_of
from ner_merge.plan.source_map import Follows, SourceMap, TensorChoice, UnitChoice
from ner_merge.recipe.options import NerOptions, split_patterns

RULES = """\
- a 2-D floating-point weight is a *matrix*, and matrices are the *scored*
  tensors: each goes to the model whose copy has the highest NER; on equal scores
  the earlier candidate wins (base first, then the fine-tuned models in recipe
  order);
- a tensor that shares its parent module with a scored tensor (`X.bias` beside a
  2-D `X.weight`) follows it, so a projection stays whole;
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
  everything that chooses with it (its parent module, its unit);
- a model's `exclude`: it never supplies a matching tensor, nor anything that
  chooses with one; the base is always eligible;
- a copy holding NaN or Inf (under `nonfinite: lose`) may not supply its tensor,
  nor anything that chooses with it;
- `compat: nerd` scores as the reference tool NERD does: every 1-D or 2-D
  `.weight` (norms, embeddings and lm_head included) by the NER of its min-max
  scaled bfloat16 copy (a 1-D weight by the entropy of its values);
- a hand-edited source map: a tensor whose source differs from what these rules
  decide is an `override`; everything that follows it (its bias, its block's or
  layer's other tensors, its layer's norms) is decided again from the final
  sources;
- `stabilize: true` (on by default with `compat: nerd`, as in NERD): in every
  `.weight` not taken from the base, the base's value is put back where
  |base| >= |chosen| and |base| < median(|chosen|); the share of base values is
  recorded per tensor, and such tensors are not bit-identical to their source.
"""


class SelectionError(ValueError):
    """No model may supply a tensor (every eligible copy holds NaN or Inf)."""


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor, as far as selection is concerned."""

    name: str
    layer: int | None
    shape: tuple[int, ...]
    scored: bool  # the scoring mode scores it
    floating: bool = True  # integer buffers come from the base
    base_only: bool = False  # an optional tensor some models lack: from the base

    @property
    def size(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Selection:
    """The recipe's selection options: what chooses together, and who may win."""

    granularity: Granularity = "tensor"
    keep_base: tuple[str, ...] = ()
    exclusions: tuple[tuple[str, ...], ...] = ()  # per candidate, base first

    @classmethod
    def from_options(
        cls, options: NerOptions, exclusions: tuple[tuple[str, ...], ...]
    ) -> "Selection":
        """A recipe's options, and each candidate's `exclude` patterns."""
        return cls(options.granularity, split_patterns(options.keep_base), exclusions)

    @classmethod
    def of_map(cls, source_map: SourceMap, where: str) -> "Selection":
        """The options a map was planned with; a map whose options are not valid
        NER options (edited by hand) is refused, naming the file and field."""
        given = {k: v for k, v in source_map.options.items() if v is not None}
        options, problems = NerOptions.checked(given, "options")
        if options is None:
            raise SourceMapError("\n".join(f"{where}: {line}" for line in problems))
        exclusions = tuple(model.exclude for model in source_map.models)
        return cls.from_options(options, exclusions)

    def check_patterns(self, tensors: list[str], models: list[str], where: str):
        """Every pattern must match some tensor: one that matches none is a typo.
        Every such pattern is named at once, a line each."""
        options = [("parameters.keep_base", self.keep_base)] + [
            (f"parameters.exclude of model {model}", patterns)
            for model, patterns in zip(models, self.exclusions)
        ]
        problems = [
            f"{where}: {option}: pattern {pattern!r} matches no tensor of these "
            f"models (their names run from {tensors[0]} to {tensors[-1]})"
            + _whole_name_hint(pattern, tensors)
            for option, patterns in options
            for pattern in patterns
            if not any(fnmatchcase(name, pattern) for name in tensors)
        ]
        if problems:
            raise RecipeError("\n".join(problems))

    def kept(self, name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in self.keep_base)

    def eligible(self, name: str, count: int) -> tuple[bool, ...]:
        """Per candidate: may it supply this tensor? The base always may."""
        patterns = list(self.exclusions) + [()] * (count - len(self.exclusions))
        return tuple(
            index == 0 or not any(fnmatchcase(name, p) for p in patterns[index])
            for index in range(count)
        )


def _whole_name_hint(pattern: str, tensors: list[str]) -> str:
    """A pattern written as part of a name (`lm_head`) matches nothing, since a
    glob matches whole names: suggest the glob that would match."""
    wider = f"*{pattern.strip('*')}*"
    if any(fnmatchcase(name, wider) for name in tensors):
        return f"; did you mean {wider!r}? A pattern matches whole names"
    return ""


@dataclass(frozen=True)
class Group:
    """Tensors that take one source together: a scored tensor or a unit (block
    or layer), and the tensors that go with it."""

    unit: str | None  # None: a scored tensor choosing alone
    scored: tuple[TensorSpec, ...]
    followers: tuple[tuple[TensorSpec, Follows], ...]
    kept: bool  # keep_base matched a member: from the base, not scored
    eligible: tuple[bool, ...]  # per candidate, by `exclude`

    @property
    def members(self) -> tuple[TensorSpec, ...]:
        return self.scored + tuple(tensor for tensor, _ in self.followers)


@dataclass(frozen=True)
class Grouping:
    """Every output tensor, sorted into how its source is decided."""

    order: tuple[str, ...]  # output order
    groups: tuple[Group, ...]
    by_layer: tuple[tuple[TensorSpec, bool, tuple[bool, ...]], ...]  # + kept, eligible
    fixed: tuple[TensorSpec, ...]  # from the base: integer buffers, optional tensors

    def to_score(self) -> list[TensorSpec]:
        """The tensors whose scores the decisions need (kept groups need none)."""
        return [t for group in self.groups if not group.kept for t in group.scored]


def group_tensors(
    tensors: list[TensorSpec], selection: Selection, count: int
) -> Grouping:
    """Step 1: groups that choose as one, and the tensors left to other rules."""
    scored: dict[str, list[TensorSpec]] = {}  # group key -> its scored tensors
    units: dict[str, str | None] = {}
    # parent module -> its scored tensor, and the key of that tensor's group
    leaders: dict[str, tuple[TensorSpec, str]] = {}
    for tensor in tensors:
        if tensor.scored and tensor.floating and not tensor.base_only:
            unit = unit_of(tensor.name, tensor.layer, selection.granularity)
            scored.setdefault(unit or tensor.name, []).append(tensor)
            units[unit or tensor.name] = unit
            leaders.setdefault(parent(tensor.name), (tensor, unit or tensor.name))
    followers: dict[str, list[tuple[TensorSpec, Follows]]] = {key: [] for key in scored}
    by_layer, fixed = [], []
    for tensor in tensors:
        if not tensor.floating or tensor.base_only:
            fixed.append(tensor)
            continue
        if tensor.scored:
            continue
        unit = unit_of(tensor.name, tensor.layer, selection.granularity)
        if parent(tensor.name) in leaders:
            leader, key = leaders[parent(tensor.name)]
            followers[key].append((tensor, Follows(kind="tensor", name=leader.name)))
        elif unit in scored:
            followers[unit].append((tensor, Follows(kind="unit", name=unit)))
        else:
            kept = selection.kept(tensor.name)
            by_layer.append((tensor, kept, selection.eligible(tensor.name, count)))
    groups = []
    for key, members in scored.items():
        everyone = members + [tensor for tensor, _ in followers[key]]
        flags = [selection.eligible(t.name, count) for t in everyone]
        groups.append(
            Group(
                unit=units[key],
                scored=tuple(members),
                followers=tuple(followers[key]),
                kept=any(selection.kept(t.name) for t in everyone),
                eligible=tuple(all(column) for column in zip(*flags)),
            )
        )
    return Grouping(
        order=tuple(tensor.name for tensor in tensors),
        groups=tuple(groups),
        by_layer=tuple(by_layer),
        fixed=tuple(fixed),
    )


def first_best(
    values: list[float | None], eligible: list[bool] | tuple[bool, ...] | None = None
) -> int | None:
    """Index of the largest eligible value, the earliest on ties (the tie rule).

    None (a copy that could not be scored) loses to any number, and so does an
    ineligible model; None if no value is left.
    """
    best = None
    for index, value in enumerate(values):
        if value is None or (eligible is not None and not eligible[index]):
            continue
        if best is None or value > values[best]:
            best = index
    return best


def mean(values: list[float | None]) -> float | None:
    """Mean score of a unit's copies from one model; None if any is not finite."""
    if any(value is None for value in values):
        return None
    return sum(values) / len(values)


def allowed(
    tensors: tuple[TensorSpec, ...] | list[TensorSpec],
    eligible: tuple[bool, ...],
    nonfinite: dict[str, list[bool]],
) -> tuple[bool, ...]:
    """Per candidate: may it supply these tensors, which choose together? Not if
    `exclude` bars it, nor if its copy of any of them holds NaN or Inf."""
    flags = [nonfinite[t.name] for t in tensors if t.name in nonfinite]
    return tuple(
        ok and not any(flag[index] for flag in flags)
        for index, ok in enumerate(eligible)
    )


# Rounding of a mean of scores (each at most 1), per score in it: two means that
# differ by less may have been rounded apart.
MEAN_ROUNDING = 4 * sys.float_info.epsilon


def uncertain_copies(
    grouping: Grouping,
    scores: dict[str, list[float | None]],
    bounds: dict[str, list[float]],
    nonfinite: dict[str, list[bool]] | None = None,
    contents: dict[str, list[str | None]] | None = None,
) -> set[tuple[str, int]]:
    """Step 2, first half with float32 scores: the copies (tensor, candidate) to
    score exactly before `choose`, so that every winner is the exact scores'.

    bounds: per scored tensor, how far each candidate's score may lie from its
    exact score (0: it is exact). contents: per scored tensor, each candidate's
    content hash where known; equal hashes are equal exact scores.

    A group's winner is certain when its mean score beats each other candidate's
    by more than their two mean bounds (so their exact means keep that order),
    or the other's copies are the very bytes of the winner's (equal exact scores,
    a tie that candidate order breaks the same way). Otherwise the contenders,
    every candidate whose interval reaches the highest lower end, are scored
    exactly: then none of the others can reach them, and `choose`, comparing
    plain scores, picks among the contenders as exact scores do, ties included.
    """
    nonfinite, contents = nonfinite or {}, contents or {}
    return {
        (tensor.name, candidate)
        for group in grouping.groups
        if not group.kept
        for candidate in _contenders(group, scores, bounds, nonfinite, contents)
        for tensor in group.scored
        if bounds[tensor.name][candidate] > 0
    }


def _contenders(
    group: Group,
    scores: dict[str, list[float | None]],
    bounds: dict[str, list[float]],
    nonfinite: dict[str, list[bool]],
    contents: dict[str, list[str | None]],
) -> list[int]:
    """The candidates that may win the group by exact scores, if its winner by
    these scores is not certain; none if it is (see `uncertain_copies`)."""
    count = len(group.eligible)
    usable = allowed(group.members, group.eligible, nonfinite)
    means = [mean([scores[t.name][i] for t in group.scored]) for i in range(count)]
    doubts = [mean([bounds[t.name][i] for t in group.scored]) for i in range(count)]
    winner = first_best(means, usable)
    if winner is None:
        return []  # no candidate: choose() refuses the group
    others = [
        i for i in range(count) if i != winner and usable[i] and means[i] is not None
    ]
    slack = MEAN_ROUNDING * len(group.scored)

    hashes = [contents.get(t.name, [None] * count) for t in group.scored]

    def same_bytes(other: int) -> bool:
        return all(h[winner] is not None and h[winner] == h[other] for h in hashes)

    if all(
        means[winner] - means[other] > doubts[winner] + doubts[other] + slack
        or same_bytes(other)
        for other in others
    ):
        return []
    candidates = [winner, *others]
    floor = max(means[i] - doubts[i] for i in candidates)
    return [i for i in candidates if means[i] + doubts[i] + slack >= floor]


def choose(
    grouping: Grouping,
    scores: dict[str, list[float | None]],
    names: list[str],
    nonfinite: dict[str, list[bool]] | None = None,
    pinned: dict[str, str] | None = None,
    bounds: dict[str, list[float]] | None = None,
    refined: set[str] | frozenset[str] = frozenset(),
) -> dict[str, TensorChoice]:
    """Step 2: every tensor's choice, in output order.

    scores: per scored tensor, each candidate's score (None: NaN or Inf).
    nonfinite: per tensor with a NaN or Inf anywhere, which candidates' copies
    hold one; such a copy may not supply anything of its group.
    pinned: tensors whose source was set by hand (`reconcile`): they keep it,
    with rule `override` where the rules decide otherwise, and whatever follows
    them is decided from it.
    bounds, refined: recorded in the choices as they are (see
    `uncertain_copies`): the bounds of scores not exact, and the scored tensors
    whose copies were scored exactly to settle a near tie.
    """
    nonfinite, pinned, bounds = nonfinite or {}, pinned or {}, bounds or {}
    count = len(names)
    choices: dict[str, TensorChoice] = {}
    supplied: dict[int | None, Counter] = {}  # layer -> candidate -> values

    def recorded_bounds(tensor: TensorSpec) -> dict[str, float]:
        given = bounds.get(tensor.name, [0.0] * count)
        return {name: bound for name, bound in zip(names, given) if bound > 0}

    def source_of(tensor: TensorSpec, decided: int) -> tuple[str, bool]:
        """The final source, and whether it was set against the rules."""
        source = pinned.get(tensor.name, names[decided])
        return source, source != names[decided]

    def refuse_base(tensor: TensorSpec, why: str) -> None:
        if nonfinite.get(tensor.name, [False])[0]:
            raise SelectionError(
                f"tensor {tensor.name} must come from the base ({why}), whose copy "
                "holds NaN or Inf values"
            )

    for group in grouping.groups:
        usable = allowed(group.members, group.eligible, nonfinite)
        if group.kept:
            winner, rule = 0, "keep-base"
            for tensor in group.members:
                refuse_base(tensor, "keep_base")
        else:
            means = [
                mean([scores[t.name][index] for t in group.scored])
                for index in range(count)
            ]
            winner = first_best(means, usable)
            if winner is None:
                what = group.unit or group.scored[0].name
                raise SelectionError(f"{what}: no eligible model's copy is finite")
            rule = "highest-ner" if group.unit is None else "highest-mean-ner"
        excluded = (
            () if group.kept else tuple(n for n, ok in zip(names, usable) if not ok)
        )
        for tensor in group.scored:
            source, edited = source_of(tensor, winner)
            choices[tensor.name] = TensorChoice(
                source=source,
                rule="override" if edited else rule,
                unit=group.unit,
                layer=tensor.layer,
                shape=tensor.shape,
                scores={} if group.kept else dict(zip(names, scores[tensor.name])),
                bounds={} if group.kept else recorded_bounds(tensor),
                refined=tensor.name in refined,
                excluded=excluded,
            )
            tally = supplied.setdefault(tensor.layer, Counter())
            tally[names.index(source)] += tensor.size
        unit_source = largest_supplier([choices[t.name] for t in group.scored], names)
        for tensor, follows in group.followers:
            leader = unit_source
            if follows.kind == "tensor":
                leader = names.index(choices[follows.name].source)
            source, edited = source_of(tensor, leader)
            rule = "keep-base" if group.kept and leader == 0 else "follows"
            choices[tensor.name] = TensorChoice(
                source=source,
                rule="override" if edited else rule,
                follows=None if edited or rule == "keep-base" else follows,
                layer=tensor.layer,
                shape=tensor.shape,
                excluded=excluded,
            )
    for tensor, kept, eligible in grouping.by_layer:
        if kept:
            refuse_base(tensor, "keep_base")
            winner, rule, follows, excluded = 0, "keep-base", None, ()
        else:
            usable = allowed([tensor], eligible, nonfinite)
            counts = supplied.get(tensor.layer, Counter())
            winner = first_best([counts[i] for i in range(count)], usable)
            if winner is None:
                raise SelectionError(
                    f"{tensor.name}: no eligible model's copy is finite"
                )
            kind = "non-layer" if tensor.layer is None else "layer"
            rule, follows = "follows", Follows(kind=kind)
            excluded = tuple(n for n, ok in zip(names, usable) if not ok)
        source, edited = source_of(tensor, winner)
        choices[tensor.name] = TensorChoice(
            source=source,
            rule="override" if edited else rule,
            follows=None if edited else follows,
            layer=tensor.layer,
            shape=tensor.shape,
            excluded=excluded,
        )
    for tensor in grouping.fixed:
        source, edited = source_of(tensor, 0)
        if not edited:
            refuse_base(tensor, "it is not scored")
        choices[tensor.name] = TensorChoice(
            source=source,
            rule="override" if edited else "base",
            layer=tensor.layer,
            shape=tensor.shape,
        )
    return {name: choices[name] for name in grouping.order}


def largest_supplier(choices: list[TensorChoice], names: list[str]) -> int:
    """The candidate whose copies supply most of these tensors' values (the
    earliest on ties): a unit's winner, unless a hand edit split the unit."""
    shares = Counter()
    for choice in choices:
        shares[names.index(choice.source)] += prod(choice.shape)
    return first_best([shares[index] for index in range(len(names))])


def unit_decisions(source_map: SourceMap) -> dict[str, UnitChoice]:
    """What each block or layer chose as one, derived from its tensors: the model
    supplying most of its scored values, and each model's mean score over them."""
    names = [model.name for model in source_map.models]
    members: dict[str, list[TensorChoice]] = {}
    for choice in source_map.tensors.values():
        if choice.unit is not None and choice.scores:
            members.setdefault(choice.unit, []).append(choice)
    return {
        unit: UnitChoice(
            source=names[largest_supplier(scored, names)],
            scores={n: mean([c.scores.get(n) for c in scored]) for n in names},
        )
        for unit, scored in members.items()
    }


def reconcile(
    source_map: SourceMap,
    grouping: Grouping,
    nonfinite: dict[str, list[bool]] | None = None,
) -> SourceMap:
    """Step 3: a hand-edited map made consistent with the rules.

    A tensor whose source differs from what the rules decide from the map's own
    scores was edited; so was any tensor marked `override` (a bias kept where it
    is while its matrix moves, say). Those are
    pinned and `choose` runs again: an edited matrix takes its bias along, an
    edited block or layer its other tensors, a layer whose matrices all moved its
    norms, and every edit reads `override`. A map without edits comes back as it
    was (stabilize shares, bounds and refinements included).
    """
    names = [model.name for model in source_map.models]
    planned = {t.name: source_map.tensors[t.name] for t in grouping.to_score()}
    scores = {name: [c.scores.get(n) for n in names] for name, c in planned.items()}
    bounds = {
        name: [c.bounds.get(n, 0.0) for n in names] for name, c in planned.items()
    }
    refined = {name for name, choice in planned.items() if choice.refined}
    decided = choose(grouping, scores, names, nonfinite, None, bounds, refined)
    followers = {t.name for g in grouping.groups for t, _ in g.followers}
    followers |= {tensor.name for tensor, _, _ in grouping.by_layer}
    pinned = {  # a follower stays put, even as what it follows moves, only if asked
        name: choice.source
        for name, choice in source_map.tensors.items()
        if choice.rule == "override"
        or (name not in followers and choice.source != decided[name].source)
    }
    if pinned:
        chosen = choose(grouping, scores, names, nonfinite, pinned, bounds, refined)
    else:
        chosen = decided
    tensors = {
        name: choice.model_copy(
            update={"stabilized": _kept_share(source_map, name, choice)}
        )
        for name, choice in chosen.items()
    }
    return source_map.model_copy(update={"tensors": tensors})


def _kept_share(source_map: SourceMap, name: str, choice: TensorChoice) -> float | None:
    """The planned stabilize share, while the tensor keeps its planned source."""
    planned = source_map.tensors[name]
    return planned.stabilized if planned.source == choice.source else None
