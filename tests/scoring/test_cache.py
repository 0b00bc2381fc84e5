"""The score cache and content identity: hits skip reading, any changed byte and
any other option miss, writes are atomic."""

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ner_merge.errors import SourceMapError
from ner_merge.models import content
from ner_merge.models.cache_folder import CACHE_DIR_VARIABLE, default_cache_dir
from ner_merge.models.resolve import ResolvedModel
from ner_merge.plan import planner
from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from ner_merge.scoring import streamed as scoring
from ner_merge.scoring.cache import ScoreCache
from ner_merge.scoring.ner import BoundedScore
from ner_merge.scoring.workers import LocalWorkers
from tests import pico
from tests.helpers import reference_ner, run_merge, write_recipe


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = content.read_bytes

    def counting(header):
        reads.append(header.path)
        return real(header)

    monkeypatch.setattr(content, "read_bytes", counting)
    return reads


def test_second_plan_reads_nothing_in_any_order(tmp_path, qwen_trio, monkeypatch):
    base, one, two = qwen_trio["base"], qwen_trio["one"], qwen_trio["two"]
    first = plan(Recipe.from_file(write_recipe(tmp_path / "a.yml", base, [one, two])))
    reads = _count_reads(monkeypatch)
    again = plan(Recipe.from_file(write_recipe(tmp_path / "b.yml", base, [one, two])))
    assert reads == [] and again.tensors == first.tensors
    # Another recipe over the same models, in another order: still nothing to read.
    swapped = plan(Recipe.from_file(write_recipe(tmp_path / "c.yml", two, [one])))
    assert reads == []
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (
        swapped.tensors[name].scores[str(two)] == first.tensors[name].scores[str(two)]
    )


def test_a_changed_model_is_scored_again(tmp_path, qwen_trio, monkeypatch):
    base = qwen_trio["base"]
    one = shutil.copytree(qwen_trio["one"], tmp_path / "one")
    recipe = Recipe.from_file(write_recipe(tmp_path / "r.yml", base, [one]))
    plan(recipe)
    changed = pico.fine_tune(pico.base_model("qwen2", seed=0), seed=9)
    pico.save_model(changed, one)
    reads = _count_reads(monkeypatch)
    replanned = plan(Recipe.from_file(write_recipe(tmp_path / "r.yml", base, [one])))
    assert reads and set(reads) == {str(one / "model.safetensors")}
    tensor = replanned.tensors["model.layers.1.mlp.down_proj.weight"]
    assert tensor.scores[str(one)] != tensor.scores[str(base)]


def test_options_and_kernel_version_are_part_of_the_key(tmp_path, monkeypatch):
    ScoreCache(tmp_path, {"mode": "a"}).put("f" * 64, "exact", BoundedScore(0.5))
    assert ScoreCache(tmp_path, {"mode": "a"}).get("f" * 64, "exact").value == 0.5
    assert ScoreCache(tmp_path, {"mode": "b"}).get("f" * 64, "exact") is None
    assert ScoreCache(tmp_path, {"mode": "a"}).get("e" * 64, "exact") is None
    monkeypatch.setattr("ner_merge.scoring.cache.KERNEL_VERSION", -1)
    assert ScoreCache(tmp_path, {"mode": "a"}).get("f" * 64, "exact") is None


def test_fast_and_exact_scores_are_kept_apart(tmp_path):
    cache = ScoreCache(tmp_path, {})
    cache.put("f" * 64, "fast", BoundedScore(0.5, 1e-6))
    assert cache.get("f" * 64, "fast") == BoundedScore(0.5, 1e-6)
    assert cache.get("f" * 64, "exact") is None  # a bounded score is not exact
    cache.put("f" * 64, "exact", BoundedScore(0.5000004))  # a refinement adds it
    assert cache.get("f" * 64, "exact") == BoundedScore(0.5000004)
    assert cache.get("f" * 64, "fast") == BoundedScore(0.5, 1e-6)  # which stays
    cache.put("e" * 64, "fast", BoundedScore(0.25))  # float32 gave way: exact
    assert cache.get("e" * 64, "exact") == cache.get("e" * 64, "fast")


def test_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.setenv(CACHE_DIR_VARIABLE, "off")
    assert default_cache_dir() is None
    monkeypatch.delenv(CACHE_DIR_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "ner-merge"


def test_leftovers_of_a_killed_run_are_harmless(tmp_path):
    cache = ScoreCache(tmp_path, {})
    cache.put("f" * 64, "exact", BoundedScore(0.25))
    (entry,) = (tmp_path).rglob("*.json")
    (entry.parent / "tmpkilled.tmp").write_text('{"tensor": "w", "ner"')  # cut short
    assert cache.get("f" * 64, "exact") == BoundedScore(0.25)
    entry.write_text("not json")  # a corrupt entry is a miss, then overwritten
    assert cache.get("f" * 64, "exact") is None
    cache.put("f" * 64, "exact", BoundedScore(0.75))
    assert cache.get("f" * 64, "exact") == BoundedScore(0.75)


def _hammer(root: str, worker: int) -> None:
    cache = ScoreCache(root, {})
    for i in range(200):
        cache.put(f"{i % 5}" * 64, "fast", BoundedScore(float(i % 5), 1e-6))
        found = cache.get(f"{(i + worker) % 5}" * 64, "fast")
        assert found is None or found == BoundedScore(float((i + worker) % 5), 1e-6)


def test_concurrent_writers_never_leave_a_broken_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_hammer, args=(str(tmp_path), w)) for w in (0, 1, 2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(worker.exitcode == 0 for worker in workers)
    entries = list(tmp_path.rglob("*.json"))
    assert len(entries) == 5 and not list(tmp_path.rglob("*.tmp"))
    for entry in entries:
        assert json.loads(entry.read_text())["ner"] in {0.0, 1.0, 2.0, 3.0, 4.0}


def test_disabled_cache_writes_nothing(
    tmp_path, qwen_trio, monkeypatch, isolated_score_cache
):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, "off")
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    plan(Recipe.from_file(recipe))
    assert list(isolated_score_cache.iterdir()) == []


# --- exact identity --------------------------------------------------------------

PLANTED = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory) -> Path:
    """A model a few MB large, so that sampling a few blocks of its file (as an
    earlier fingerprint did) would miss a change to one matrix."""
    model = pico.base_model("qwen2", hidden_size=128, intermediate_size=512)
    return pico.save_model(model, tmp_path_factory.mktemp("wide") / "base")


def _with_one_matrix_replaced(base: Path, target: Path) -> Path:
    """The base with one matrix made orthogonal: a LoRA-sized change that wins."""
    shutil.copytree(base, target)
    tensors = load_file(target / "model.safetensors")
    rows, columns = tensors[PLANTED].shape  # 32 x 128: orthonormal rows
    q, _ = torch.linalg.qr(torch.randn(columns, rows, dtype=torch.float64))
    tensors[PLANTED] = q.T.to(tensors[PLANTED].dtype).contiguous()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_fine_tune_that_changed_one_matrix_is_told_apart(tmp_path, wide_base):
    tuned = _with_one_matrix_replaced(wide_base, tmp_path / "tuned")
    source_map = plan(
        Recipe.from_file(write_recipe(tmp_path / "r.yml", wide_base, [tuned])),
        quiet=True,
    )
    fingerprints = [model.fingerprint for model in source_map.models]
    assert fingerprints[0] != fingerprints[1]
    choice = source_map.tensors[PLANTED]
    planted = load_file(tuned / "model.safetensors")[PLANTED]
    assert choice.source == str(tuned)
    assert choice.scores[str(tuned)] == pytest.approx(reference_ner(planted), abs=1e-6)
    others = [c for n, c in source_map.tensors.items() if c.scores and n != PLANTED]
    assert all(c.source == str(wide_base) for c in others)  # equal copies: base


@pytest.mark.parametrize("workers", [1, 2])
def test_identical_copies_are_scored_once(tmp_path, wide_base, monkeypatch, workers):
    """Also when two workers read identical copies at the same moment."""
    tuned = _with_one_matrix_replaced(wide_base, tmp_path / "tuned")
    calls = []
    counting = scoring.Scoring(
        "counting", 1, scoring.SPEC_SCORING.selects, lambda m: calls.append(1) or 0.5
    )
    monkeypatch.setattr(planner, "SPEC_SCORING", counting)
    source_map = plan(
        Recipe.from_file(write_recipe(tmp_path / "r.yml", wide_base, [tuned])),
        quiet=True,
        workers=LocalWorkers(workers),
    )
    assert len(calls) == sum(1 for c in source_map.tensors.values() if c.scores) + 1


def test_a_model_rewritten_in_place_misses_and_its_map_is_refused(
    tmp_path, wide_base, monkeypatch
):
    """Same path, same size, mtime set back: one changed tensor still counts."""
    tuned = _with_one_matrix_replaced(wide_base, tmp_path / "tuned")
    recipe = write_recipe(tmp_path / "r.yml", wide_base, [tuned])
    before = plan(Recipe.from_file(recipe), quiet=True)
    weights = tuned / "model.safetensors"
    status = weights.stat()
    header = ResolvedModel("tuned", str(tuned), None).headers[PLANTED]
    with open(weights, "r+b") as file:  # shift the matrix by one value, in place
        file.seek(header.start)
        data = file.read(header.end - header.start)
        file.seek(header.start)
        file.write(data[2:] + data[:2])
    os.utime(weights, ns=(status.st_atime_ns, status.st_mtime_ns))
    reads = _count_reads(monkeypatch)
    after = plan(Recipe.from_file(recipe), quiet=True)
    assert str(weights) in reads
    assert after.models[1].fingerprint != before.models[1].fingerprint
    assert after.tensors[PLANTED].scores != before.tensors[PLANTED].scores
    map_path = tmp_path / "map.json"
    before.save(map_path)
    stale = write_recipe(
        tmp_path / "s.yml", wide_base, [tuned], source_map=str(map_path)
    )
    with pytest.raises(SourceMapError, match="has changed"):
        run_merge(stale, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_snapshot_files_are_known_by_their_blob(tmp_path):
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    snapshot = tmp_path / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    key = content.file_key(str(snapshot / "model.safetensors"))
    assert json.loads(key) == ["hub-blob", "ab" * 32, 7]
    os.utime(blob, ns=(1, 1))  # a touched blob is still the same content
    assert content.file_key(str(snapshot / "model.safetensors")) == key
    local = tmp_path / "model.safetensors"
    local.write_bytes(b"weights")
    key = content.file_key(str(local))
    local.write_bytes(b"Weights")  # same size, another byte
    assert content.file_key(str(local)) != key


def test_a_malformed_cache_entry_is_a_miss_said_once(tmp_path, caplog):
    cache = ScoreCache(tmp_path, {})
    malformed = [
        "[1, 2]",
        '"text"',
        '{"ner": "0.5"}',
        "null",
        '{"ner": 0.5, "bound": -1.0}',
    ]
    for index, text in enumerate(malformed):
        tensor_hash = f"{index}" * 64
        cache.put(tensor_hash, "fast", BoundedScore(0.5, 1e-6))
        (entry,) = [p for p in tmp_path.rglob("*.json") if tensor_hash in p.read_text()]
        entry.write_text(text)
        assert cache.get(tensor_hash, "fast") is None
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
