"""Every family, one recipe shape: merges are bit-identical and follow the scores.

The pico models here are seeded perturbations nobody tuned the code for; only
the model folders change between families, never the recipe.
"""

import pytest

from tests.helpers import (
    FAMILY_CASES,
    assert_bit_identical_to_sources,
    brute_force_winners,
    run_merge,
    write_recipe,
)


@pytest.mark.parametrize("family, tied", FAMILY_CASES)
def test_default_recipe_takes_every_matrix_from_its_highest_ner_model(
    tmp_path, trios, family, tied
):
    trio = trios(family, tied)
    recipe = write_recipe(tmp_path / "r.yml", trio["base"], [trio["one"], trio["two"]])
    run_merge(recipe, tmp_path / "out")
    source_map = assert_bit_identical_to_sources(tmp_path / "out")
    names = [m["name"] for m in source_map["models"]]
    winners = brute_force_winners([trio["base"], trio["one"], trio["two"]])
    assert len(winners) >= 2 * 4, "too few matrices found"
    for tensor, winner in winners.items():
        assert source_map["tensors"][tensor]["source"] == names[winner], tensor
    assert ("lm_head.weight" in source_map["tensors"]) is not tied
    assert len({choice["source"] for choice in source_map["tensors"].values()}) >= 2
