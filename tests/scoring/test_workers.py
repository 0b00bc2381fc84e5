"""Local workers: the same map and cache bytes for any worker count and any
thread setting of the caller, and one clear refusal for each wrong setting."""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ner_merge.errors import ModelError, NerMergeError
from ner_merge.models.cache_folder import CACHE_DIR_VARIABLE
from ner_merge.models.content import TensorDigest
from ner_merge.models.resolve import HubFile, ResolvedModel
from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from ner_merge.scoring.streamed import (
    SPEC_SCORING,
    CopyJob,
    score_copy,
    score_elsewhere,
)
from ner_merge.scoring.workers import LocalWorkers, choose_workers
from tests.helpers import write_recipe
from tests.models.test_hub import add_to_cache
from tests.test_merge import MERGEKIT_YAML

MATRIX = "model.layers.0.mlp.down_proj.weight"


def _files(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_any_worker_count_and_thread_setting_gives_the_same_map_and_cache(
    wide_trio, tmp_path, monkeypatch
):
    recipe = Recipe.from_file(
        write_recipe(
            tmp_path / "r.yml", wide_trio["base"], [wide_trio["one"], wide_trio["two"]]
        )
    )
    threads = torch.get_num_threads()
    runs = {}
    try:
        for workers, caller_threads in ((1, 1), (1, 2), (2, 2)):
            torch.set_num_threads(caller_threads)
            cache = tmp_path / f"cache-{workers}-{caller_threads}"
            monkeypatch.setenv(CACHE_DIR_VARIABLE, str(cache))
            path = tmp_path / f"map-{workers}-{caller_threads}.json"
            plan(recipe, quiet=True, workers=LocalWorkers(workers)).save(path)
            runs[workers, caller_threads] = (path.read_bytes(), _files(cache))
    finally:
        torch.set_num_threads(threads)
    (first_map, first_cache), *others = runs.values()
    assert any(name.startswith("kernel-") for name in first_cache)
    for other_map, other_cache in others:
        assert other_map == first_map
        assert other_cache == first_cache


@pytest.mark.parametrize(
    "environment, message",
    [
        ({"NER_MERGE_WORKERS": "two"}, "$NER_MERGE_WORKERS='two': give a number"),
        ({"NER_MERGE_WORKERS": "0"}, "$NER_MERGE_WORKERS='0': give a number"),
        (
            {"NER_MERGE_WORKERS": "2", "NER_MERGE_RAY": "auto"},
            "$NER_MERGE_WORKERS and $NER_MERGE_RAY: choose local workers or a Ray",
        ),
    ],
)
def test_a_wrong_worker_variable_is_refused(environment, message, monkeypatch):
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(NerMergeError) as refusal:
        choose_workers()
    assert message in str(refusal.value)


def test_mergekit_yaml_refuses_a_wrong_worker_variable_before_reading_models(
    qwen_trio, tmp_path
):
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"], qwen_trio["two"]]
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [MERGEKIT_YAML, str(recipe), str(out)],
        env=dict(os.environ, NER_MERGE_WORKERS="two"),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "$NER_MERGE_WORKERS='two': give a number" in result.stderr
    assert not out.exists()


def test_the_options_beat_the_variables_and_cannot_be_combined(monkeypatch):
    monkeypatch.setenv("NER_MERGE_WORKERS", "two")  # never read: an option is given
    assert choose_workers(count=3).count == 3
    with pytest.raises(NerMergeError, match="--workers and --ray: choose"):
        choose_workers(count=2, ray_address="auto")
    with pytest.raises(NerMergeError, match="--ray is empty: give HOST:PORT, or auto"):
        choose_workers(count=2, ray_address="")


def test_without_ray_installed_the_option_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("NER_MERGE_RAY", "auto")
    with pytest.raises(NerMergeError) as refusal:
        choose_workers()
    assert str(refusal.value) == (
        "$NER_MERGE_RAY=auto: Ray is not installed; install it with "
        "pip install 'ner-merge[ray]'"
    )


def test_a_worker_without_the_drivers_path_reads_the_same_hub_commit(
    qwen_trio, tmp_path, monkeypatch
):
    """As a cluster's worker on another machine: the driver's snapshot path does
    not exist there, and its own Hub cache provides the very same file."""
    import huggingface_hub.constants

    driver_cache, worker_cache = tmp_path / "driver-hub", tmp_path / "worker-hub"
    commit = add_to_cache(driver_cache, "pico-org/one", qwen_trio["one"], ["main"])
    snapshot = driver_cache / "models--pico-org--one" / "snapshots" / commit
    model = ResolvedModel("pico-org/one", str(snapshot), commit)
    header = model.headers[MATRIX]
    job = CopyJob(f"model one: tensor {MATRIX}", header, "ner", SPEC_SCORING.version)
    job = CopyJob(**{**job.__dict__, "hub_file": model.hub_file(header.path)})
    assert job.hub_file == HubFile("pico-org/one", commit, "model.safetensors")
    on_driver = score_copy(job, SPEC_SCORING)

    shutil.copytree(driver_cache, worker_cache, symlinks=True)
    shutil.rmtree(driver_cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(worker_cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    on_worker = score_copy(job, SPEC_SCORING)
    assert on_worker == on_driver
    assert on_worker.score is not None


def test_an_error_stops_the_workers_before_the_plan_says_it(wide_trio, tmp_path):
    """A copy holding NaN ends the plan at once: no worker goes on scoring the
    rest behind the error (a mergekit-yaml run would hang on them at exit)."""
    poisoned = tmp_path / "one"
    shutil.copytree(wide_trio["one"], poisoned)
    tensors = load_file(poisoned / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"].view(-1)[0] = float("nan")
    save_file(tensors, poisoned / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipe(tmp_path / "r.yml", wide_trio["base"], [poisoned])
    with pytest.raises(ModelError, match="q_proj.weight holds NaN or Inf") as error:
        plan(Recipe.from_file(recipe), quiet=True, workers=LocalWorkers(2))
    # The error is still held (as click holds it, chained to its own), and with
    # it the frames of the plan: the workers must be stopped all the same.
    assert error.value.__traceback__ is not None
    scoring = [t for t in threading.enumerate() if t.name.startswith("ner-score")]
    assert not scoring


def test_a_worker_of_another_version_refuses_the_job(qwen_trio):
    model = ResolvedModel("one", str(qwen_trio["one"]), None)
    job = CopyJob("model one: tensor m", model.headers[MATRIX], "ner", -1)
    with pytest.raises(NerMergeError, match="this worker scores ner version"):
        score_elsewhere(job)


def test_a_digest_from_other_bytes_than_planned_is_refused(qwen_trio):
    """What the driver does with a worker that read another file at that path."""
    model = ResolvedModel("one", str(qwen_trio["one"]), None)
    known = model.content.digest(MATRIX)
    model.content.record(MATRIX, known)  # the same bytes: accepted
    other = TensorDigest("0" * 64, True)
    with pytest.raises(ModelError, match=f"tensor {MATRIX} was read with other bytes"):
        model.content.record(MATRIX, other)


def test_more_workers_than_memory_allows_is_warned_of_before_any_job(
    monkeypatch, caplog
):
    """An explicit count is kept (the user may know better), but said to be
    too many for the memory before any job runs."""
    monkeypatch.setattr("ner_merge.scoring.workers.available_memory", lambda: 3 * 10**9)
    started = []
    results = LocalWorkers(4).run(started.append, [1, 2, 3, 4], working_set=10**9)
    next(results)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "4 workers may hold 4.0 GB at once, more than the 3.0 GB available: fewer "
        "workers (or none given: as many as fit) avoid running out of memory"
    ]
    results.close()
    assert LocalWorkers(None).describe(10**9) == "1 worker"  # the default fits
