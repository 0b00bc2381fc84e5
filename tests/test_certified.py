"""Float32 scores with bounds choose exactly as float64 scores do, near ties included.

A trio is built with near ties on purpose: each matrix float32 scores (the tall
ones) gets fine-tuned copies whose NER differs from the base's by a chosen gap,
from 1e-7 to 1e-4, around the float32 bounds (about 2e-6 at these shapes). A
plan with fast scoring must then make every choice a float64-only plan makes,
refining exactly the decisions its bounds leave in doubt.
"""

import json

import pytest
import torch
from click.testing import CliRunner

from ner_merge.cli import main
from ner_merge.planner import plan
from ner_merge.recipe import Recipe
from ner_merge.report import plan_table
from ner_merge.workers import LocalWorkers
from tests import pico
from tests.helpers import reference_ner, write_recipe


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


def eigensolves(monkeypatch) -> list[torch.dtype]:
    """The dtype of every eigensolve from now on: one per score computed, in
    either precision (check_device's 2 x 2 probe aside)."""
    solved = []
    real = torch.linalg.eigvalsh

    def counted(gram, *args, **kwargs):
        if gram.shape[0] > 2:
            solved.append(gram.dtype)
        return real(gram, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counted)
    return solved


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


def test_every_choice_is_the_float64_choice_and_only_near_ties_are_refined(
    tmp_path, near_ties
):
    fast = _plan(tmp_path, near_ties["folders"])
    exact = _plan(tmp_path, near_ties["folders"], scoring="exact")
    assert {n: c.source for n, c in fast.tensors.items()} == {
        n: c.source for n, c in exact.tensors.items()
    }
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


def test_refinement_gives_the_same_map_bytes_for_any_worker_count(tmp_path, near_ties):
    one = _plan(tmp_path, near_ties["folders"], workers=1)
    two = _plan(tmp_path, near_ties["folders"], workers=2)
    assert one.to_json() == two.to_json()
    assert any(c.refined for c in one.tensors.values())


def test_a_second_plan_reuses_both_kinds_of_scores_and_writes_the_same_map(
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


def test_the_table_counts_the_refined_decisions(tmp_path, near_ties):
    fast = _plan(tmp_path, near_ties["folders"])
    refined = sum(choice.refined for choice in fast.tensors.values())
    decisions = sum(bool(choice.scores) for choice in fast.tensors.values())
    bounded = sum(len(choice.bounds) for choice in fast.tensors.values())
    assert plan_table(fast).endswith(
        f"decisions: {decisions}, of which {refined} near ties refined in float64; "
        f"scores: {3 * decisions}, {bounded} float32 with bounds, "
        f"{3 * decisions - bounded} exact"
    )


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
