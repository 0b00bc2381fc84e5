"""The selection rules, table by table, on made-up tensor lists (no models)."""

import json

import pytest

from ner_merge.errors import SourceMapError
from ner_merge.models.names import layer_prefix, tensor_type, unit_of
from ner_merge.plan.selection import (
    Selection,
    SelectionError,
    TensorSpec,
    choose,
    group_tensors,
    reconcile,
    uncertain_copies,
    unit_decisions,
)
from ner_merge.plan.source_map import Follows, ModelEntry, SourceMap
from ner_merge.recipe.options import ScoringRoute

NAMES = ["base", "one", "two"]


def _layer(index: int) -> list[TensorSpec]:
    prefix = f"model.layers.{index}"
    return [
        TensorSpec(f"{prefix}.input_layernorm.weight", index, (4,), scored=False),
        TensorSpec(f"{prefix}.self_attn.q_proj.weight", index, (4, 4), scored=True),
        TensorSpec(f"{prefix}.self_attn.q_proj.bias", index, (4,), scored=False),
        TensorSpec(f"{prefix}.self_attn.o_proj.weight", index, (4, 4), scored=True),
        TensorSpec(f"{prefix}.mlp.up_proj.weight", index, (8, 4), scored=True),
        TensorSpec(f"{prefix}.mlp.down_proj.weight", index, (4, 8), scored=True),
        TensorSpec(f"{prefix}.post_attention_layernorm.weight", index, (4,), False),
    ]


TENSORS = [
    TensorSpec("model.embed_tokens.weight", None, (16, 4), scored=True),
    *_layer(0),
    *_layer(1),
    TensorSpec("model.norm.weight", None, (4,), scored=False),
    TensorSpec("model.steps", None, (1,), scored=False, floating=False),
    TensorSpec("lm_head.weight", None, (16, 4), scored=True, base_only=True),
]
Q0, Q0_BIAS = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
)
NORM0 = "model.layers.0.input_layernorm.weight"


def _scores(winners: dict[str, int], default: int = 0) -> dict[str, list[float]]:
    """Scores where the given model wins each scored tensor (default: `default`)."""
    scores = {}
    for tensor in TENSORS:
        if tensor.scored and not tensor.base_only:
            winner = winners.get(tensor.name, default)
            scores[tensor.name] = [0.9 if i == winner else 0.5 for i in range(3)]
    return scores


def _choose(scores, selection: Selection | None = None, **options):
    grouping = group_tensors(TENSORS, selection or Selection(), len(NAMES))
    return choose(grouping, scores, NAMES, **options)


# --- names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layer, prefix, kind, module, whole",
    [
        (Q0, 0, "model.layers.0", "self_attn.q_proj.weight",
         "model.layers.0.self_attn", "model.layers.0"),
        ("encoder.layer.3.output.dense.weight", 3, "encoder.layer.3",
         "output.dense.weight", "encoder.layer.3.output", "encoder.layer.3"),
        ("model.embed_tokens.weight", None, None, "model.embed_tokens.weight",
         None, None),
        ("odd.weight", 2, None, "odd.weight", None, None),  # index missing
    ],
)  # fmt: skip
def test_name_structure(name, layer, prefix, kind, module, whole):
    assert layer_prefix(name, layer) == prefix
    assert tensor_type(name, layer) == kind
    assert unit_of(name, layer, "tensor") is None
    assert unit_of(name, layer, "module") == module
    assert unit_of(name, layer, "layer") == whole


# --- grouping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "granularity, groups, follow_kinds",
    [
        ("tensor", 9, {Q0_BIAS: "tensor"}),
        ("module", 5, {Q0_BIAS: "tensor"}),
        (
            "layer",
            3,
            {
                Q0_BIAS: "tensor",
                NORM0: "unit",
                "model.layers.0.post_attention_layernorm.weight": "unit",
            },
        ),
    ],
)
def test_grouping_at_each_granularity(granularity, groups, follow_kinds):
    grouping = group_tensors(TENSORS, Selection(granularity), 3)
    assert len(grouping.groups) == groups
    followers = {
        t.name: f.kind
        for g in grouping.groups
        for t, f in g.followers
        if t.layer != 1  # layer 1 repeats layer 0
    }
    assert followers == follow_kinds
    by_layer = {t.name for t, _, _ in grouping.by_layer}
    assert ("model.norm.weight" in by_layer) and (NORM0 in by_layer) == (
        granularity != "layer"
    )
    assert [t.name for t in grouping.fixed] == ["model.steps", "lm_head.weight"]


# --- choosing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, winner",
    [([0.5, 0.5, 0.5], "base"), ([0.4, 0.6, 0.6], "one"), ([0.4, 0.5, 0.6], "two"),
     ([None, 0.1, None], "one")],
)  # fmt: skip
def test_highest_score_wins_and_ties_go_to_the_earlier(scores, winner):
    choices = _choose(_scores({}) | {Q0: scores})
    assert choices[Q0].source == winner and choices[Q0].rule == "highest-ner"
    assert choices[Q0_BIAS].source == winner
    assert choices[Q0_BIAS].follows == Follows(kind="tensor", name=Q0)


def test_norms_follow_the_majority_of_their_layers_parameters():
    # Layer 0: "one" wins the two 32-value MLP matrices, "two" both 16-value ones.
    winners = {
        "model.layers.0.mlp.up_proj.weight": 1,
        "model.layers.0.mlp.down_proj.weight": 1,
        Q0: 2,
        "model.layers.0.self_attn.o_proj.weight": 2,
        "model.embed_tokens.weight": 2,
    }
    choices = _choose(_scores(winners))
    assert choices[NORM0].source == "one"
    assert choices[NORM0].follows == Follows(kind="layer")
    assert choices["model.layers.1.input_layernorm.weight"].source == "base"
    assert choices["model.norm.weight"].source == "two"
    assert choices["model.norm.weight"].follows == Follows(kind="non-layer")
    assert choices["model.steps"].rule == "base"
    assert choices["lm_head.weight"].source == "base"


def test_a_block_chooses_by_its_mean_score():
    scores = _scores({}) | {
        Q0: [0.5, 0.9, 0.1],  # one leads here ...
        "model.layers.0.self_attn.o_proj.weight": [0.5, 0.2, 0.8],  # ... two here
    }  # means: base 0.5, one 0.55, two 0.45
    choices = _choose(scores, Selection("module"))
    for name in (Q0, "model.layers.0.self_attn.o_proj.weight", Q0_BIAS):
        assert choices[name].source == "one", name
    assert choices[Q0].rule == "highest-mean-ner"
    assert choices[Q0].unit == "model.layers.0.self_attn"


def test_keep_base_takes_the_whole_group():
    choices = _choose(_scores({Q0: 2}), Selection(keep_base=("*.q_proj.bias",)))
    assert choices[Q0].source == "base" and choices[Q0].rule == "keep-base"
    assert choices[Q0_BIAS].rule == "keep-base"


def test_exclude_and_nonfinite_copies_lose_their_group():
    scores = _scores({}) | {Q0: [0.4, 0.6, 0.9]}
    excluded = Selection(exclusions=((), (), ("*.q_proj.bias",)))
    choices = _choose(scores, excluded)
    assert choices[Q0].source == "one" and choices[Q0].excluded == ("two",)
    poisoned = {Q0_BIAS: [False, False, True]}  # two's bias holds NaN
    choices = _choose(scores, nonfinite=poisoned)
    assert choices[Q0].source == "one" and choices[Q0_BIAS].source == "one"


def test_a_nonfinite_base_copy_that_must_be_used_is_refused():
    with pytest.raises(SelectionError, match="model.steps"):
        _choose(_scores({}), nonfinite={"model.steps": [True, False, False]})
    everywhere = {NORM0: [True, True, True]}
    with pytest.raises(SelectionError, match=NORM0):
        _choose(_scores({}), nonfinite=everywhere)


# --- hand edits -------------------------------------------------------------------


def _planned(selection: Selection, winners: dict[str, int]) -> tuple:
    grouping = group_tensors(TENSORS, selection, 3)
    choices = choose(grouping, _scores(winners), NAMES)
    models = tuple(
        ModelEntry(name=n, path=f"/m/{n}", revision=None, fingerprint=n, role=r)
        for n, r in zip(NAMES, ["base", "fine-tuned", "fine-tuned"])
    )
    return grouping, SourceMap(models=models, options={}, tensors=choices)


def _edit(source_map: SourceMap, **sources: str) -> SourceMap:
    tensors = dict(source_map.tensors)
    for key, source in sources.items():
        name, _, rule = key.partition("__")
        name = {"q0": Q0, "bias": Q0_BIAS, "norm": NORM0}.get(name, name)
        update = {"source": source} | ({"rule": rule} if rule else {})
        tensors[name] = tensors[name].model_copy(update=update)
    return source_map.model_copy(update={"tensors": tensors})


LAYER0_MATRICES = [t.name for t in _layer(0) if t.scored]


def test_an_unedited_map_comes_back_unchanged():
    for granularity in ("tensor", "module", "layer"):
        grouping, planned = _planned(Selection(granularity), {Q0: 1})
        assert reconcile(planned, grouping) == planned


def test_an_edited_matrix_takes_its_bias_and_reads_override():
    grouping, planned = _planned(Selection(), {})
    result = reconcile(_edit(planned, q0="two"), grouping)
    assert result.tensors[Q0].source == "two" and result.tensors[Q0].rule == "override"
    assert result.tensors[Q0_BIAS].source == "two"
    assert result.tensors[Q0_BIAS].rule == "follows"


def test_a_follower_moves_alone_only_when_marked_override():
    grouping, planned = _planned(Selection(), {})
    assert reconcile(_edit(planned, bias="two"), grouping) == planned
    result = reconcile(_edit(planned, bias__override="two"), grouping)
    assert result.tensors[Q0_BIAS].source == "two"
    assert result.tensors[Q0].source == "base"


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_an_edited_unit_member_reads_override_and_units_follow(granularity):
    grouping, planned = _planned(Selection(granularity), {})
    unit = planned.tensors[Q0].unit
    result = reconcile(_edit(planned, q0="two"), grouping)
    assert result.tensors[Q0].rule == "override" and result.tensors[Q0].unit == unit
    assert result.tensors[Q0_BIAS].source == "two"
    assert (
        unit_decisions(result)[unit].source == "base"
    )  # base still supplies most of it
    moved = {name: "two" for name in LAYER0_MATRICES}
    result = reconcile(_edit(planned, **moved), grouping)
    whole = "model.layers.0" if granularity == "layer" else "model.layers.0.mlp"
    assert unit_decisions(result)[whole].source == "two"
    if granularity == "layer":  # a layer moved whole takes its norms along
        assert result.tensors[NORM0].source == "two"


def test_moving_a_layers_matrices_at_tensor_granularity_moves_its_norms():
    grouping, planned = _planned(Selection(), {})
    result = reconcile(
        _edit(planned, **dict.fromkeys(LAYER0_MATRICES, "one")), grouping
    )
    assert result.tensors[NORM0].source == "one"
    assert (
        result.tensors["model.layers.0.post_attention_layernorm.weight"].source == "one"
    )
    assert result.tensors["model.layers.1.input_layernorm.weight"].source == "base"


def test_an_edited_keep_base_tensor_reads_override():
    grouping, planned = _planned(Selection(keep_base=("*.q_proj.*",)), {})
    result = reconcile(_edit(planned, q0="one"), grouping)
    assert result.tensors[Q0].rule == "override" and result.tensors[Q0].source == "one"
    assert result.tensors[Q0_BIAS].source == "one"
    assert result.tensors[Q0_BIAS].rule == "follows"


def _older(source_map: SourceMap) -> dict:
    """A map as versions 1 and 2 wrote it: exact scores only, no bounds, no
    route."""
    document = json.loads(source_map.to_json())
    del document["route"]
    for choice in document["tensors"].values():
        del choice["bounds"], choice["refined"]
    return document | {"format_version": 2}


def _read_as(version: int, route: str) -> dict:
    """What an older map's upgrade adds: option `scoring` as it ran (versions 1
    and 2 scored exactly), and the route, without a reason."""
    reason = f"a format {version} map, which does not record why"
    return {
        "options": {"scoring": route},
        "route": ScoringRoute(scoring=route, reason=reason),
    }


def test_a_version_2_map_is_read_as_exact_scores(tmp_path):
    _, planned = _planned(Selection("module"), {Q0: 2})
    (tmp_path / "v2.json").write_text(json.dumps(_older(planned)))
    upgraded = SourceMap.load(tmp_path / "v2.json")
    assert upgraded == planned.model_copy(update=_read_as(2, "exact"))


@pytest.mark.parametrize("scoring", ["fast", "exact"])
def test_a_version_3_map_takes_its_route_from_option_scoring(tmp_path, scoring):
    """Version 3 recorded `scoring` resolved (fast by default), but no route."""
    _, planned = _planned(Selection(), {Q0: 1})
    document = json.loads(planned.to_json())
    del document["route"]
    document |= {"format_version": 3, "options": {"scoring": scoring}}
    (tmp_path / "v3.json").write_text(json.dumps(document))
    upgraded = SourceMap.load(tmp_path / "v3.json")
    assert upgraded == planned.model_copy(update=_read_as(3, scoring))
    nerd = document | {"options": {"compat": "nerd", "scoring": None}}
    (tmp_path / "nerd.json").write_text(json.dumps(nerd))
    assert SourceMap.load(tmp_path / "nerd.json").route.scoring == "nerd"
    del document["options"]["scoring"]  # a hand-made map: no route to tell
    (tmp_path / "bare.json").write_text(json.dumps(document))
    assert SourceMap.load(tmp_path / "bare.json").route is None


def test_a_version_1_map_is_read_and_upgraded(tmp_path):
    """Version 1 stored units and said what a tensor follows in one string."""
    grouping, planned = _planned(Selection("layer"), {Q0: 1})
    document = _older(planned)
    for choice in document["tensors"].values():
        follows = choice["follows"]
        if follows is not None:
            choice["follows"] = {
                "tensor": follows["name"],
                "unit": follows["name"],
                "layer": f"layer {choice['layer']}",
                "non-layer": "non-layer matrices",
            }[follows["kind"]]
    kinds = {c["follows"] for c in document["tensors"].values() if c["follows"]}
    assert {
        "layer 0",
        "non-layer matrices",
        Q0_BIAS.replace(".bias", ".weight"),
    } & kinds
    units = unit_decisions(planned)
    document |= {
        "format_version": 1,
        "units": {u: c.model_dump(mode="json") for u, c in units.items()},
    }
    (tmp_path / "v1.json").write_text(json.dumps(document))
    upgraded = SourceMap.load(tmp_path / "v1.json")
    assert upgraded == planned.model_copy(update=_read_as(1, "exact"))


def test_a_follower_marked_override_stays_while_its_matrix_moves():
    grouping, planned = _planned(Selection(), {})
    result = reconcile(_edit(planned, q0="two", bias__override="base"), grouping)
    assert result.tensors[Q0].source == "two"
    assert result.tensors[Q0_BIAS].source == "base"
    assert result.tensors[Q0_BIAS].rule == "override"
    assert reconcile(result, grouping) == result  # reconciling again changes nothing


@pytest.mark.parametrize(
    "options, says",
    [
        ({"granularity": "Layer"}, "options.granularity"),
        ({"granularty": "layer"}, "options.granularty: unknown option"),
    ],
)
def test_a_map_with_invalid_options_is_refused_naming_the_field(options, says):
    _, planned = _planned(Selection(), {})
    edited = planned.model_copy(update={"options": options})
    with pytest.raises(SourceMapError, match=f"plan.json: {says}"):
        Selection.of_map(edited, "plan.json")


# --- decisions from float32 scores with bounds -----------------------------------

UP0 = "model.layers.0.mlp.up_proj.weight"
DOWN0 = "model.layers.0.mlp.down_proj.weight"


def _bounded(bound: float, **near: tuple[float, ...]) -> tuple[dict, dict]:
    """Scores where the base wins every scored tensor by far (0.9 to 0.5), each
    score carrying `bound`; `near` gives some tensors' scores outright."""
    names = {"q0": Q0, "up0": UP0, "down0": DOWN0}
    scores = _scores({})
    for key, values in near.items():
        scores[names[key]] = list(values)
    return scores, {name: [bound] * 3 for name in scores}


def _uncertain(scores, bounds, selection=None, **options) -> set[tuple[str, int]]:
    grouping = group_tensors(TENSORS, selection or Selection(), len(NAMES))
    return uncertain_copies(grouping, scores, bounds, **options)


@pytest.mark.parametrize("gap", [1e-7, 1e-6, 1e-5, 1e-4])
def test_a_gap_within_the_bounds_sends_the_contenders_to_be_scored_exactly(gap):
    # one beats two by `gap`; both 1e-5 from their exact scores; base far below.
    scores, bounds = _bounded(1e-5, q0=(0.5, 0.7 + gap, 0.7))
    expected = {(Q0, 1), (Q0, 2)} if gap <= 2e-5 else set()
    assert _uncertain(scores, bounds) == expected


def test_a_candidate_that_cannot_reach_the_leaders_is_not_rescored():
    scores, bounds = _bounded(1e-5, q0=(0.70001, 0.7, 0.69))
    assert _uncertain(scores, bounds) == {(Q0, 0), (Q0, 1)}


def test_exact_scores_and_equal_bytes_need_no_rescoring():
    scores, bounds = _bounded(0.0, q0=(0.7, 0.7, 0.5))  # an exact tie: base wins
    assert _uncertain(scores, bounds) == set()
    scores, bounds = _bounded(1e-5, q0=(0.7, 0.7, 0.5))  # the same bytes twice
    contents = {Q0: ["same", "same", "other"]}
    assert _uncertain(scores, bounds, contents=contents) == set()
    assert _uncertain(scores, bounds, contents={Q0: ["a", "b", "c"]}) == {
        (Q0, 0),
        (Q0, 1),
    }


def test_a_copy_already_exact_is_not_rescored():
    scores, bounds = _bounded(1e-5, q0=(0.5, 0.7 + 1e-6, 0.7))
    bounds[Q0][2] = 0.0
    assert _uncertain(scores, bounds) == {(Q0, 1)}


def test_a_block_decides_by_its_mean_score_and_mean_bound():
    # up: one ahead by 3e-5; down: two ahead by 1e-5; so one's mean is ahead by 1e-5.
    near = {"up0": (0.5, 0.70003, 0.7), "down0": (0.5, 0.7, 0.70001)}
    module = Selection("module")
    assert _uncertain(*_bounded(4e-6, **near), module) == set()
    assert _uncertain(*_bounded(6e-6, **near), module) == {
        (name, model) for name in (UP0, DOWN0) for model in (1, 2)
    }


def test_a_candidate_that_may_not_win_raises_no_doubt():
    scores, bounds = _bounded(1e-5, q0=(0.5, 0.7 + 1e-6, 0.7))
    excluded = Selection(exclusions=((), (), ("*.q_proj.*",)))
    assert _uncertain(scores, bounds, excluded) == set()
    nonfinite = {Q0: [False, False, True]}
    assert _uncertain(scores, bounds, nonfinite=nonfinite) == set()
    kept = Selection(keep_base=("*.q_proj.*",))
    assert _uncertain(scores, bounds, kept) == set()
