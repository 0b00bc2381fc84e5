"""The score cache: hits skip reading, changes and options miss, writes are atomic."""

import json
import multiprocessing
import shutil

from ner_merge import planner
from ner_merge.cache import CACHE_DIR_VARIABLE, ScoreCache, default_cache_dir
from ner_merge.planner import plan
from ner_merge.recipe import Recipe
from tests import pico
from tests.conftest import write_recipe


def _count_reads(monkeypatch) -> list[str]:
    reads: list[str] = []
    real = planner.read_tensor

    def counting(header):
        reads.append(header.path)
        return real(header)

    monkeypatch.setattr(planner, "read_tensor", counting)
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
    ScoreCache(tmp_path, {"mode": "a"}).put("f" * 64, "w", 0.5)
    assert ScoreCache(tmp_path, {"mode": "a"}).get("f" * 64, "w") == 0.5
    assert ScoreCache(tmp_path, {"mode": "b"}).get("f" * 64, "w") is None
    assert ScoreCache(tmp_path, {"mode": "a"}).get("e" * 64, "w") is None
    monkeypatch.setattr("ner_merge.cache.KERNEL_VERSION", -1)
    assert ScoreCache(tmp_path, {"mode": "a"}).get("f" * 64, "w") is None


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
    cache.put("f" * 64, "w", 0.25)
    (entry,) = (tmp_path).rglob("*.json")
    (entry.parent / "tmpkilled.tmp").write_text('{"tensor": "w", "ner"')  # cut short
    assert cache.get("f" * 64, "w") == 0.25
    entry.write_text("not json")  # a corrupt entry is a miss, then overwritten
    assert cache.get("f" * 64, "w") is None
    cache.put("f" * 64, "w", 0.75)
    assert cache.get("f" * 64, "w") == 0.75


def _hammer(root: str, worker: int) -> None:
    cache = ScoreCache(root, {})
    for i in range(200):
        cache.put("f" * 64, f"t{i % 5}", float(i % 5))
        value = cache.get("f" * 64, f"t{(i + worker) % 5}")
        assert value is None or value == float((i + worker) % 5)


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
