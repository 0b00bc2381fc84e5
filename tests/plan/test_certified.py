"""Float32 scores with bounds choose exactly as float64 scores do, near ties included.

Two trios are built with near ties on purpose. In the first, each matrix float32
scores (the tall ones) gets fine-tuned copies whose NER differs from the base's
by a chosen gap, from 1e-7 to 1e-4, around the float32 bounds (about 2e-6 at these
shapes). In the second, the middle layer's copies in two models differ by less
than float32's actual error, so float32 alone would pick the other model: only
refining the near ties in float64 gets them right. A plan with fast scoring
(asked for by name: the tests do not rely on the default) must make every choice
a float64-only plan makes, refining exactly the decisions its bounds leave in
doubt.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ner_merge.cli import main
from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from ner_merge.report.markdown import plan_table, render_report
from ner_merge.scoring.ner import fast_score
from ner_merge.scoring.workers import LocalWorkers, reproducible_scoring
from tests import pico
from tests.helpers import (
    brute_force_winners,
    eigensolves,
    load_tensors,
    reference_ner,
    write_recipe,
)


def with_gap(weight: torch.Tensor, gap: float) -> torch.Tensor:
    """`weight` with its singular values raised to a power chosen so that its NER
    moves by `gap` (float64 Newton steps; storing in float32 blurs it slightly)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    target = reference_ner(weight) + gap

    def moved(power: float) -> torch.Tensor:
        return (u * s**power) @ vh

    power, step = 1.0, 1e-3
    for _ in range(4):
        here = reference_ner(moved(power))
        slope = (reference_ner(moved(power + step)) - here) / step
        power += (target - here) / slope
        step = max(abs(power - 1.0) / 10, 1e-7)
    return moved(power).float()


@pytest.fixture(scope="module")
def near_ties(tmp_path_factory) -> dict:
    return build_near_ties(tmp_path_factory.mktemp("near-ties"))


def build_near_ties(root) -> dict:
    """Base, `one` (NER + gap) and `two` (NER + gap / 2, or - gap on odd
    matrices) in float32: gaps from 1e-7 to 1e-4 over the tall matrices."""
    base = pico.base_model("qwen2", seed=0)
    one, two = (pico.fine_tune(base, seed=s) for s in (1, 2))
    tall = [
        name
        for name, weight in base.state_dict().items()
        if weight.ndim == 2 and max(weight.shape) >= 1.5 * min(weight.shape)
    ]
    gaps = torch.logspace(-7, -4, len(tall)).tolist()
    with torch.no_grad():
        for number, (name, gap) in enumerate(zip(tall, gaps)):
            weight = base.state_dict()[name]
            one.state_dict()[name].copy_(with_gap(weight, gap))
            other = -gap if number % 2 else gap / 2
            two.state_dict()[name].copy_(with_gap(weight, other))
    folders = {
        label: pico.save_model(model, root / label, dtype=torch.float32)
        for label, model in (("base", base), ("one", one), ("two", two))
    }
    return {"folders": folders, "tall": tall}


def float32_misorders(winner: torch.Tensor) -> torch.Tensor:
    """A copy of `winner` (float32, scored in float32) whose float64 NER is lower,
    by 1e-10 or more, yet whose float32 score is higher: each entry moved by about
    an ulp, seed after seed, until float32's actual error (about 1e-8 at these
    shapes) outweighs the gap. The gap is far above float64's error (1e-15)."""
    exact = reference_ner(winner)
    with reproducible_scoring():  # the planner's settings: the planner's bits
        fast = fast_score(winner).value
        for seed in range(100):
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(winner.shape, generator=generator, dtype=torch.float64)
            loser = (winner.double() * (1 + 3e-7 * noise)).float()
            if exact - reference_ner(loser) >= 1e-10 and fast_score(loser).value > fast:
                return loser
    pytest.fail("found no copy that float32 ranks above `winner` and float64 below")


@pytest.fixture(scope="module")
def wrong_winners(tmp_path_factory) -> dict:
    """A float32 trio whose middle layer (layer 1 of 2, which the planner scores in
    float32 first) float32 alone gets wrong: there `one` holds the base's initial
    matrices, the base a copy of each 1e-4 lower in NER (out of the race), and
    `two` a copy of each tall matrix that float64 ranks below `one`'s and float32
    above (`float32_misorders`); `two`'s square matrices (scored exactly) are
    `one`'s bytes. So at every granularity the middle layer's units go to `one`
    by float64 scores, and to `two` by float32 scores."""
    base = pico.base_model("qwen2", seed=0)
    one, two = (pico.fine_tune(base, seed=s) for s in (1, 2))
    misordered = []
    with torch.no_grad():
        for name, weight in base.state_dict().items():
            if ".layers.1." not in name or weight.ndim != 2:
                continue
            weight = weight.float().clone()
            one.state_dict()[name].copy_(weight)
            base.state_dict()[name].copy_(with_gap(weight, -1e-4))
            if fast_score(weight).exact:  # square: float32 cannot score it
                two.state_dict()[name].copy_(weight)
            else:
                two.state_dict()[name].copy_(float32_misorders(weight))
                misordered.append(name)
    root = tmp_path_factory.mktemp("wrong-winners")
    folders = {
        label: pico.save_model(model, root / label, dtype=torch.float32)
        for label, model in (("base", base), ("one", one), ("two", two))
    }
    return {"folders": folders, "misordered": misordered}


def _plan(tmp_path, folders, workers: int = 1, scoring: str = "fast", **options):
    """A plan of the trio, fast unless asked otherwise (auto is exact on a CPU)."""
    recipe = write_recipe(
        tmp_path / "r.yml",
        folders["base"],
        [folders["one"], folders["two"]],
        dtype="float32",
        scoring=scoring,
        **options,
    )
    return plan(Recipe.from_file(recipe), quiet=True, workers=LocalWorkers(workers))


def _chosen_otherwise(fast, exact) -> str:
    """A line per tensor whose source differs between two maps (fast, exact),
    naming it and both sources; empty if none does."""
    return "\n".join(
        f"{name}: {Path(choice.source).name}, not {Path(truth.source).name}"
        for name, choice in fast.tensors.items()
        if choice.source != (truth := exact.tensors[name]).source
    )


def test_every_choice_is_the_float64_choice_and_only_near_ties_are_refined(
    tmp_path, near_ties
):
    fast = _plan(tmp_path, near_ties["folders"])
    exact = _plan(tmp_path, near_ties["folders"], scoring="exact")
    assert not (otherwise := _chosen_otherwise(fast, exact)), otherwise
    assert all(not c.bounds and not c.refined for c in exact.tensors.values())
    refined = {n for n, c in fast.tensors.items() if c.refined}
    settled = {n for n, c in fast.tensors.items() if c.bounds and not c.refined}
    assert refined and settled  # both ways of deciding were taken
    for name in near_ties["tall"]:
        choice, truth = fast.tensors[name], exact.tensors[name]
        ordered = sorted(truth.scores.values(), reverse=True)
        gap = ordered[0] - ordered[1]
        if gap < 1e-6:  # far inside the bounds: refined, or exact from the start
            assert name in refined or not choice.bounds, (name, gap)
        if name in refined:  # the contenders' scores are now float64's
            top = [m for m, s in truth.scores.items() if s >= ordered[1]]
            assert all(choice.scores[m] == truth.scores[m] for m in top)
        for model, score in choice.scores.items():  # every bound holds
            assert abs(score - truth.scores[model]) <= choice.bounds.get(model, 0.0)


def test_the_middle_layer_shows_which_kinds_float32_settles(tmp_path, near_ties):
    """Layer 1 of 2 is scored fast first; in layer 0, a kind float32 could not
    settle there is scored exactly at once, the others fast."""
    fast = _plan(tmp_path, near_ties["folders"])
    kinds = [name for name in near_ties["tall"] if ".layers.0." in name]
    outcomes = {}
    for name in kinds:
        probed = fast.tensors[name.replace(".layers.0.", ".layers.1.")]
        settled = bool(probed.bounds) and not probed.refined
        outcomes[settled] = name
        here = fast.tensors[name]
        assert (bool(here.bounds) or here.refined) == settled, name
    assert set(outcomes) == {True, False}  # both kinds of kind occur


def test_determinism_refined_maps_are_the_same_bytes_for_any_worker_count(
    tmp_path, near_ties
):
    one = _plan(tmp_path, near_ties["folders"], workers=1)
    two = _plan(tmp_path, near_ties["folders"], workers=2)
    assert one.to_json() == two.to_json()
    assert any(c.refined for c in one.tensors.values())


def test_determinism_a_cached_plan_writes_the_cold_plans_map_and_reuses_its_scores(
    tmp_path, near_ties, monkeypatch
):
    first = _plan(tmp_path, near_ties["folders"])
    solved = eigensolves(monkeypatch)
    assert _plan(tmp_path, near_ties["folders"]).to_json() == first.to_json()
    assert solved == []
    # An exact plan now computes only the tall copies that were never refined:
    # the refined ones, and those float32 gave way on, are cached exactly.
    exact = _plan(tmp_path, near_ties["folders"], scoring="exact")
    tall_copies = 3 * len(near_ties["tall"])
    assert 0 < len(solved) < tall_copies and set(solved) == {torch.float64}
    assert {n: c.source for n, c in exact.tensors.items()} == {
        n: c.source for n, c in first.tensors.items()
    }


def test_float32_alone_ranks_the_middle_layers_copies_the_wrong_way(wrong_winners):
    """The premise of the tests below, checked on the files the plans read: the
    float64 reference ranks `one` first, float32 scores rank `two` first, and the
    gap lies within the float32 bounds (the planner cannot settle it)."""
    folders = wrong_winners["folders"]
    one, two = (load_tensors(folders[label]) for label in ("one", "two"))
    assert len(wrong_winners["misordered"]) == 5  # k, v, gate, up, down
    with reproducible_scoring():
        for name in wrong_winners["misordered"]:
            gap = reference_ner(one[name]) - reference_ner(two[name])
            fast_one, fast_two = fast_score(one[name]), fast_score(two[name])
            assert gap >= 1e-10, name
            assert fast_two.value > fast_one.value, name
            assert gap < fast_one.bound + fast_two.bound, name


@pytest.mark.parametrize("granularity", ["tensor", "module", "layer"])
def test_where_float32_picks_the_wrong_winner_the_plan_picks_float64s(
    tmp_path, wrong_winners, granularity
):
    folders = wrong_winners["folders"]
    fast = _plan(tmp_path, folders, granularity=granularity)
    exact = _plan(tmp_path, folders, granularity=granularity, scoring="exact")
    assert not (otherwise := _chosen_otherwise(fast, exact)), otherwise
    for name in wrong_winners["misordered"]:
        assert fast.tensors[name].source == str(folders["one"]), name
        assert fast.tensors[name].refined, name
    if granularity == "tensor":  # and float64's choices are the reference's
        models = [folders[label] for label in ("base", "one", "two")]
        for name, winner in brute_force_winners(models).items():
            assert fast.tensors[name].source == str(models[winner]), name


def _unit(name: str, granularity: str) -> str:
    """The unit a tensor chooses with, read off its name here (decoder layers
    are `....layers.N.BLOCK....` in these models); outside the layers, itself."""
    found = re.match(r"(.*\.layers\.\d+)\.([^.]+)\.", name)
    if granularity == "tensor" or found is None:
        return name
    return found[1] if granularity == "layer" else f"{found[1]}.{found[2]}"


def _rules(report: str) -> dict[str, str]:
    """Each tensor row of a report: tensor name -> its rule column."""
    rows = re.findall(r"^\| `([^`]+)` \|.*\| ([^|]+) \|$", report, re.M)
    return dict(rows)


@pytest.mark.parametrize("granularity", ["tensor", "module", "layer"])
def test_the_report_marks_each_refined_decision_and_counts_units(
    tmp_path, wrong_winners, granularity
):
    """The note stands on exactly the refined tensors, and the summary counts
    decisions and refinements in units of the granularity (a block or layer is
    one decision however many tensors it holds)."""
    fast = _plan(tmp_path, wrong_winners["folders"], granularity=granularity)
    report = render_report(fast, Recipe.from_file(tmp_path / "r.yml"), "now")
    rules = _rules(report)
    assert rules.keys() == fast.tensors.keys()
    refined = {name for name, choice in fast.tensors.items() if choice.refined}
    assert set(wrong_winners["misordered"]) <= refined
    noted = {name for name, rule in rules.items() if "refined in float64" in rule}
    assert noted == refined
    scored = [name for name, choice in fast.tensors.items() if choice.scores]
    decisions = {_unit(name, granularity) for name in scored}
    units = {_unit(name, granularity) for name in refined}
    bounded = sum(len(choice.bounds) for choice in fast.tensors.values())
    summary = (
        f"decisions: {len(decisions)}, of which {len(units)} near ties refined in "
        f"float64; scores: {3 * len(scored)}, {bounded} float32 with bounds, "
        f"{3 * len(scored) - bounded} exact"
    )
    route = "route fast (asked for (scoring: fast)); "
    assert plan_table(fast).splitlines()[-1] == route + summary
    assert f"Scoring: {route}{summary}." in report
    exact = _plan(tmp_path, wrong_winners["folders"], scoring="exact")
    exact_report = render_report(exact, Recipe.from_file(tmp_path / "r.yml"), "now")
    assert "near tie," not in exact_report
    assert "of which 0 near ties refined in float64;" in exact_report


def test_plan_exact_scores_every_copy_in_float64(tmp_path, near_ties):
    folders = near_ties["folders"]
    recipe = write_recipe(
        tmp_path / "r.yml", folders["base"], [folders["one"], folders["two"]]
    )
    out = tmp_path / "e.json"
    args = ["plan", str(recipe), "--exact", "--quiet", "-o", str(out)]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    exact = json.loads(out.read_text())
    assert exact["options"]["scoring"] == "exact"
    assert all(not c["bounds"] and not c["refined"] for c in exact["tensors"].values())
    fast = _plan(tmp_path, folders)
    assert {n: c["source"] for n, c in exact["tensors"].items()} == {
        n: c.source for n, c in fast.tensors.items()
    }


def test_exact_does_not_apply_to_the_reference_tools_rule(tmp_path, near_ties):
    folders = near_ties["folders"]
    recipe = write_recipe(
        tmp_path / "r.yml", folders["base"], [folders["one"]], compat="nerd"
    )
    done = CliRunner().invoke(main, ["plan", str(recipe), "--exact", "--show"])
    assert done.exit_code == 1
    assert done.output.strip() == (
        f"Error: {recipe} with --exact: parameters.scoring: does not apply with "
        "compat: nerd, which scores by NERD's own float32 rule; remove one of them "
        "(got 'exact')"
    )


def test_recipes_of_other_granularity_share_the_float32_scores(
    tmp_path, near_ties, monkeypatch
):
    """Which copies are scored in float32 depends on the models alone, so a
    recipe at another granularity finds every float32 score in the cache (as
    `ner-merge compare` needs), and computes at most float64 refinements."""
    _plan(tmp_path, near_ties["folders"])
    solved = eigensolves(monkeypatch)
    for granularity in ("module", "layer"):
        other = _plan(tmp_path, near_ties["folders"], granularity=granularity)
        exact = _plan(
            tmp_path, near_ties["folders"], granularity=granularity, scoring="exact"
        )
        assert {n: c.source for n, c in other.tensors.items()} == {
            n: c.source for n, c in exact.tensors.items()
        }
    assert torch.float32 not in solved
