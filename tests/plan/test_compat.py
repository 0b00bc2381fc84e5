"""compat: nerd reproduces the reference tool's choices; stabilize its second stage.

The reference tool's rules are restated here, in numpy, from its description
(/work/shared/notes/ner-method.md), without the package's code.
"""

import json

import numpy as np
import pytest
import torch

from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from ner_merge.scoring.nerd import nerd_score
from tests import pico
from tests.helpers import (
    assert_bit_identical_to_sources,
    load_tensors,
    reference_stabilize,
    run_merge,
    twin,
    write_recipe,
)


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even) -> float32, by bit arithmetic."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def reference_tool_score(weight: torch.Tensor) -> float:
    """The reference tool's score of one weight."""
    x = to_bfloat16(weight.float().numpy())  # it loads models in bfloat16
    x = (x - x.min()) / max(x.max() - x.min(), np.float32(1e-10))
    x = to_bfloat16(x.astype(np.float32))
    if x.ndim == 1:
        x = x[None, :]
    if min(x.shape) == 1:
        values = np.abs(x).ravel().astype(np.float64)
    else:
        values = np.linalg.svd(x, compute_uv=False).astype(np.float64)
    values = values[values > 1e-12]
    if len(values) <= 1:
        return 0.0
    p = values / values.sum()
    return float(-(p * np.log2(p)).sum() / np.log2(len(values)))


def reference_tool_choices(folders) -> dict[str, int]:
    """Index of the model each tensor comes from, by the reference tool's rules:
    every module's `.weight` is scored, the first highest score wins (base
    first), and the module's other tensors (biases) go with its weight."""
    loaded = [load_tensors(folder) for folder in folders]
    choices = {}
    for name in loaded[0]:
        if name.endswith(".weight"):
            scores = [reference_tool_score(tensors[name]) for tensors in loaded]
            choices[name] = scores.index(max(scores))
    for name in loaded[0]:
        if name not in choices:
            choices[name] = choices[name.rsplit(".", 1)[0] + ".weight"]
    return choices


def test_score_matches_the_restated_rules():
    generator = torch.Generator().manual_seed(0)
    for shape in [(48, 32), (32, 48), (40,), (1, 30), (30, 1)]:
        weight = torch.randn(shape, generator=generator).to(torch.bfloat16)
        assert nerd_score(weight) == pytest.approx(
            reference_tool_score(weight), abs=1e-5
        )
    assert nerd_score(torch.ones(8)) == 0.0  # a constant scales to zeros


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "phi3"])
def test_choices_equal_the_reference_tool_rules(tmp_path, trios, family):
    trio = trios(family)
    copy_of_one = twin(trio["one"], tmp_path / "copy_of_one")
    folders = [trio["base"], trio["one"], trio["two"], copy_of_one]
    recipe = write_recipe(tmp_path / "r.yml", folders[0], folders[1:], compat="nerd")
    source_map = plan(Recipe.from_file(recipe), quiet=True)
    names = [model.name for model in source_map.models]
    expected = reference_tool_choices(folders)
    assert set(expected) == set(source_map.tensors)
    for name, winner in expected.items():
        assert source_map.tensors[name].source == names[winner], name
    norms = [n for n in expected if "norm" in n]
    assert norms and all(source_map.tensors[n].scores for n in norms)
    assert names[3] not in {c.source for c in source_map.tensors.values()}  # ties


def test_stabilize_puts_back_small_base_values_and_says_so(tmp_path, trios):
    trio = trios("llama")
    recipe = write_recipe(
        tmp_path / "r.yml",
        trio["base"],
        [trio["one"], trio["two"]],
        compat="nerd",
        stabilize=True,
    )
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out)  # stabilized: by the rule
    base = source_map["models"][0]["name"]
    for name, choice in source_map["tensors"].items():  # `.weight`s only, as NERD
        untouched = choice["source"] == base or not name.endswith(".weight")
        assert (choice["stabilized"] is None) == untouched, name
    shares = [c["stabilized"] for c in source_map["tensors"].values()]
    assert any(share and 0 < share < 1 for share in shares)
    report = (out / "ner_report.md").read_text()
    assert "Stabilize: share of base values per module" in report


@pytest.fixture(scope="module")
def biased_trio(tmp_path_factory) -> list:
    """A Qwen2 trio whose base has real (non-zero) q/k/v biases, so that a
    stabilize stage that touched biases would change them."""
    base = pico.base_model("qwen2", seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if name.endswith(".bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    one, two = pico.fine_tune(base, seed=4), pico.fine_tune(base, seed=5)
    root = tmp_path_factory.mktemp("biased")
    return [
        pico.save_model(model, root / name)
        for name, model in (("base", base), ("one", one), ("two", two))
    ]


def test_compat_nerd_output_is_the_reference_tools_default_output(
    tmp_path, biased_trio
):
    """NERD's default pipeline is stage 1 (choices) then stage 2 (stabilize, on
    `.weight` tensors only): `compat: nerd` alone must give those bytes."""
    recipe = write_recipe(
        tmp_path / "r.yml", biased_trio[0], biased_trio[1:], compat="nerd"
    )
    out = tmp_path / "out"
    run_merge(recipe, out)
    merged = load_tensors(out)
    loaded = [load_tensors(folder) for folder in biased_trio]
    choices = reference_tool_choices(biased_trio)
    biases_it_would_change = 0
    for name, winner in choices.items():
        chosen, base = loaded[winner][name], loaded[0][name]
        expected = chosen
        if winner != 0 and name.endswith(".weight"):
            expected = reference_stabilize(base, chosen)
        elif winner != 0 and not torch.equal(reference_stabilize(base, chosen), chosen):
            biases_it_would_change += 1
        assert torch.equal(
            merged[name].view(torch.int16), expected.view(torch.int16)
        ), name
    assert biases_it_would_change > 0  # the trio does tell the two stages apart
    source_map = json.loads((out / "ner_source_map.json").read_text())
    assert source_map["options"]["stabilize"] is True


def test_compat_nerd_without_stabilize_is_stage_one(tmp_path, biased_trio):
    recipe = write_recipe(
        tmp_path / "r.yml",
        biased_trio[0],
        biased_trio[1:],
        compat="nerd",
        stabilize=False,
    )
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out)
    assert all(c["stabilized"] is None for c in source_map["tensors"].values())
