"""`scoring: auto` (the default) takes the exact route on a CPU and the fast one on
a GPU; the map, `show` and the report say which ran and why; a plan shows one
progress bar, counting every copy it scores."""

import pytest
import torch
import tqdm
from click.testing import CliRunner

from ner_merge.cli import main
from ner_merge.errors import RecipeError
from ner_merge.plan.planner import plan
from ner_merge.plan.source_map import SourceMap
from ner_merge.recipe.options import NerOptions, ScoringRoute
from ner_merge.recipe.recipe import Recipe
from ner_merge.report.markdown import render_report
from ner_merge.scoring import streamed as scoring
from ner_merge.scoring.workers import LocalWorkers
from tests.helpers import write_recipe
from tests.plan.test_certified import build_near_ties, eigensolves

CPU_REASON = "auto on cpu: float32 saves no time on a CPU, near ties cost both"
CUDA_REASON = "auto on cuda: float64 is many times slower than float32 there"


@pytest.fixture(scope="module")
def near_ties(tmp_path_factory) -> dict:
    """A float32 trio with near ties on purpose (see tests.plan.test_certified)."""
    return build_near_ties(tmp_path_factory.mktemp("near-ties"))


@pytest.mark.parametrize(
    "device, route, reason",
    [
        (None, "exact", CPU_REASON),
        ("cpu", "exact", CPU_REASON),
        ("cuda", "fast", CUDA_REASON),
        ("cuda:1", "fast", CUDA_REASON),  # the kind, not the card, decides
    ],
)
def test_auto_is_exact_on_a_cpu_and_fast_on_a_gpu(device, route, reason):
    chosen = scoring.scoring_route(NerOptions(), device)
    assert chosen == ScoringRoute(scoring=route, reason=reason)


@pytest.mark.parametrize("asked", ["fast", "exact"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_scoring_is_taken_on_any_device(asked, device):
    chosen = scoring.scoring_route(NerOptions(scoring=asked), device)
    assert chosen == ScoringRoute(scoring=asked, reason=f"asked for (scoring: {asked})")


def test_nerd_takes_auto_and_refuses_fast_or_exact():
    nerd = NerOptions(compat="nerd", scoring="auto")
    assert scoring.scoring_route(nerd, "cuda").scoring == "nerd"
    for asked in ("fast", "exact"):
        parameters = {"compat": "nerd", "scoring": asked}
        with pytest.raises(RecipeError, match="does not apply with compat: nerd"):
            NerOptions.from_parameters(parameters)


def _recipe(tmp_path, trio, dtype: str = "bfloat16", **options) -> Recipe:
    models = [trio["one"], trio["two"]]
    path = write_recipe(tmp_path / "r.yml", trio["base"], models, dtype, **options)
    return Recipe.from_file(path)


def test_a_default_plan_on_the_cpu_scores_in_float64_only(
    tmp_path, qwen_trio, monkeypatch
):
    solved = eigensolves(monkeypatch)
    planned = plan(_recipe(tmp_path, qwen_trio), quiet=True)
    assert planned.route == ScoringRoute(scoring="exact", reason=CPU_REASON)
    assert planned.options["scoring"] == "auto"  # as asked; the route says more
    assert solved and set(solved) == {torch.float64}
    assert all(not c.bounds and not c.refined for c in planned.tensors.values())
    # Its scores are cached as exact ones: an explicit exact plan computes none.
    solved.clear()
    exact = plan(_recipe(tmp_path, qwen_trio, scoring="exact"), quiet=True)
    assert solved == []
    assert {n: c.scores for n, c in exact.tensors.items()} == {
        n: c.scores for n, c in planned.tensors.items()
    }


def test_a_default_plan_on_cuda_takes_the_fast_route(tmp_path, near_ties, monkeypatch):
    """The device check faked (no GPU here): scoring itself runs on the CPU, but
    the route, and the cache's device kind, are cuda's."""
    folders = near_ties["folders"]
    exact = plan(_recipe(tmp_path, folders, "float32", scoring="exact"), quiet=True)
    monkeypatch.setattr(scoring, "device_kind", lambda device: "cuda")
    solved = eigensolves(monkeypatch)
    fast = plan(_recipe(tmp_path, folders, "float32"), quiet=True)
    assert fast.route == ScoringRoute(scoring="fast", reason=CUDA_REASON)
    assert torch.float32 in solved  # not served the CPU plan's cached scores
    assert any(c.bounds for c in fast.tensors.values())
    assert {n: c.source for n, c in fast.tensors.items()} == {
        n: c.source for n, c in exact.tensors.items()
    }


def _cli_plan(tmp_path, trio, *args: str) -> tuple[int, str, SourceMap | None]:
    recipe = write_recipe(tmp_path / "r.yml", trio["base"], [trio["one"]])
    out = tmp_path / "plan.json"
    out.unlink(missing_ok=True)
    command = ["plan", str(recipe), "--quiet", "-o", str(out), *args]
    done = CliRunner().invoke(main, command)
    return done.exit_code, done.output, SourceMap.load(out) if out.exists() else None


@pytest.mark.parametrize(
    "args, route, asked",
    [
        ((), ScoringRoute(scoring="exact", reason=CPU_REASON), "auto"),
        (
            ("--exact",),
            ScoringRoute(scoring="exact", reason="asked for (scoring: exact)"),
            "exact",
        ),
        (
            ("--scoring", "fast"),
            ScoringRoute(scoring="fast", reason="asked for (scoring: fast)"),
            "fast",
        ),
        (
            ("--scoring", "auto"),
            ScoringRoute(scoring="exact", reason=CPU_REASON),
            "auto",
        ),
    ],
)
def test_the_map_and_show_record_the_route_and_why(
    tmp_path, qwen_trio, args, route, asked
):
    code, output, planned = _cli_plan(tmp_path, qwen_trio, *args)
    assert code == 0, output
    assert planned.route == route and planned.options["scoring"] == asked
    shown = CliRunner().invoke(main, ["show", str(tmp_path / "plan.json")])
    last = shown.output.strip().splitlines()[-1]
    assert last.startswith(f"route {route.scoring} ({route.reason}); decisions: ")
    recipe = _recipe(tmp_path, qwen_trio)
    report = render_report(planned, recipe, "now")
    assert f"Scoring: route {route.scoring} ({route.reason}); decisions" in report


def test_exact_and_another_scoring_together_are_refused(tmp_path, qwen_trio):
    code, output, planned = _cli_plan(
        tmp_path, qwen_trio, "--exact", "--scoring", "fast"
    )
    assert code == 2 and planned is None
    assert "--exact contradicts --scoring fast" in output


def test_a_recipe_asking_for_fast_scores_in_float32(tmp_path, qwen_trio, monkeypatch):
    solved = eigensolves(monkeypatch)
    planned = plan(_recipe(tmp_path, qwen_trio, scoring="fast"), quiet=True)
    assert planned.route.scoring == "fast" and torch.float32 in solved


# --- one progress bar per plan ----------------------------------------------------


@pytest.fixture
def bars(monkeypatch) -> list[tqdm.tqdm]:
    """Every tqdm bar made from now on (the planner's bars are tqdm.tqdm)."""
    made = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    return made


@pytest.fixture
def scored_copies(monkeypatch) -> list[str]:
    """Each copy a local worker reads and scores (not served by the cache)."""
    done = []
    real = scoring.score_copy

    def counted(job, *args, **kwargs):
        done.append(job.where)
        return real(job, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_copy", counted)
    return done


def test_an_exact_plan_shows_one_bar_counting_every_copy(
    tmp_path, qwen_trio, bars, scored_copies
):
    planned = plan(_recipe(tmp_path, qwen_trio), workers=LocalWorkers(1))
    matrices = sum(1 for c in planned.tensors.values() if len(c.shape) == 2)
    assert len(bars) == 1
    (bar,) = bars
    assert bar.desc == "NER scoring (tensor copies)" and bar.unit == "copy"
    assert bar.n == bar.total == 3 * matrices == len(scored_copies)


def test_a_fast_plans_bar_grows_by_its_refinements(
    tmp_path,
    near_ties,
    bars,
    scored_copies,
):
    folders = near_ties["folders"]
    recipe = _recipe(tmp_path, folders, "float32", scoring="fast")
    planned = plan(recipe, workers=LocalWorkers(1))
    copies = 3 * sum(1 for c in planned.tensors.values() if c.scores)
    assert any(c.refined for c in planned.tensors.values())
    (bar,) = bars
    assert bar.n == bar.total == len(scored_copies) > copies
    # A second plan finds every score in the cache: all counted, none computed.
    bars.clear()
    scored_copies.clear()
    plan(recipe, workers=LocalWorkers(1))
    (again,) = bars
    assert scored_copies == [] and again.n == again.total == bar.total
