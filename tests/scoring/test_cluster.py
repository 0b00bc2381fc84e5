"""Scoring on a real Ray cluster, started and stopped here, on 127.0.0.1 only
(`ner_merge.scoring.cluster.loopback_cluster`): maps, the cache, a killed worker."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from ner_merge.scoring.cluster import LOOPBACK_ENVIRONMENT, loopback_cluster
from ner_merge.scoring.workers import LocalWorkers
from tests.helpers import write_recipe

BIN = Path(sys.executable).parent
TASK_TITLE = "ray::score_elsewhere"  # a Ray worker's title while it scores


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """The address of a running two-worker Ray cluster on 127.0.0.1."""
    with loopback_cluster(workers=2) as address:
        yield address


def _recipe(trio: dict[str, Path], folder: Path) -> Path:
    return write_recipe(folder / "recipe.yml", trio["base"], [trio["one"], trio["two"]])


def _local_map(recipe: Path, folder: Path) -> bytes:
    path = folder / "local.json"
    plan(Recipe.from_file(recipe), quiet=True, workers=LocalWorkers(1)).save(path)
    return path.read_bytes()


def _plan_on_cluster(recipe: Path, address: str, out: Path, cache: Path):
    """`ner-merge plan --ray`, as a user runs it: without Ray's loopback setting
    (ner-merge sees the cluster listens on loopback only, and keeps Ray there)."""
    environment = {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENVIRONMENT}
    return subprocess.Popen(
        [BIN / "ner-merge", "plan", str(recipe), "-o", str(out), "--quiet"]
        + ["--ray", address],
        env=dict(environment, NER_MERGE_CACHE_DIR=str(cache)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_plan_on_a_ray_cluster_has_the_local_plans_bytes(
    ray_cluster, qwen_trio, tmp_path
):
    recipe = _recipe(qwen_trio, tmp_path)
    remote = tmp_path / "remote.json"
    run = _plan_on_cluster(recipe, ray_cluster, remote, tmp_path / "cold-cache")
    _, errors = run.communicate(timeout=300)
    assert run.returncode == 0, errors
    assert remote.read_bytes() == _local_map(recipe, tmp_path)
    # The workers' scores went to the driver's cache: a local plan there reads
    # no more than headers and finds every score.
    assert any((tmp_path / "cold-cache").rglob("*.json"))


def test_a_worker_killed_while_scoring_is_replaced_and_the_plan_completes(
    ray_cluster, wide_trio, tmp_path
):
    recipe = _recipe(wide_trio, tmp_path)
    remote = tmp_path / "remote.json"
    run = _plan_on_cluster(recipe, ray_cluster, remote, tmp_path / "cold-cache")
    killed = []

    def kill_a_scoring_worker():
        while run.poll() is None and not killed:
            for process in psutil.process_iter(["cmdline"]):
                command = process.info["cmdline"] or []
                if command and command[0].startswith(TASK_TITLE):
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.pid)
                    break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_scoring_worker)
    killer.start()
    _, errors = run.communicate(timeout=300)
    killer.join()
    assert killed, "no worker was caught scoring"
    assert run.returncode == 0, errors
    assert remote.read_bytes() == _local_map(recipe, tmp_path)


def test_without_a_cluster_there_the_option_says_so_before_scoring(tmp_path, qwen_trio):
    recipe = _recipe(qwen_trio, tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"  # nothing listens there
    run = _plan_on_cluster(recipe, address, tmp_path / "map.json", tmp_path / "c")
    _, errors = run.communicate(timeout=300)
    assert run.returncode == 1
    assert f"--ray {address}: cannot connect" in errors
    assert not (tmp_path / "map.json").exists()


def test_an_address_that_is_not_a_ray_cluster_is_refused_in_bounded_time(tmp_path):
    """Something listens there, but Ray never gets an answer: Ray alone would
    wait for ever. The bound is shortened for the test."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        script = (
            "import ner_merge.scoring.cluster as cluster\n"
            "cluster.CONNECT_SECONDS = 3\n"
            f"cluster.RayWorkers({address!r}, given_as='$NER_MERGE_RAY')\n"
        )
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
        )
    assert run.returncode == 1
    assert f"$NER_MERGE_RAY={address}: no Ray cluster answered within 3 s" in run.stderr
