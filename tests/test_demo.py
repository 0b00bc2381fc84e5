"""The demo trio behaves like real models: an early-stopped base, fine-tunes
that move its weights by a small relative amount, and a log that says so truly."""

import math
import os
import re
import stat

import pytest
import torch

from ner_merge import demo
from tests.helpers import load_tensors


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> tuple[dict, list[str]]:
    log: list[str] = []
    paths = demo.build(tmp_path_factory.mktemp("demo"), log.append)
    return paths, log


def test_the_base_stops_at_its_best_validation_loss(trio):
    _, log = trio
    found = re.match(r"base: (\d+) steps .* kept step (\d+), the lowest", log[0])
    steps, kept = int(found[1]), int(found[2])
    # It stopped because validation loss stopped improving, not at a bound.
    assert steps < demo.MAX_PRETRAIN_STEPS
    assert steps - kept == demo.PATIENCE * demo.EVALUATE_EVERY


def test_each_fine_tune_moves_the_weights_as_real_fine_tunes_do_and_says_so(trio):
    paths, log = trio
    base = load_tensors(paths["base"])
    for name, line in zip(("sea", "kitchen"), log[1:]):
        tuned = load_tensors(paths[name])
        assert {t.dtype for t in tuned.values()} == {torch.float32}  # not rounded
        change = math.sqrt(
            sum((tuned[k].double() - w.double()).norm() ** 2 for k, w in base.items())
            / sum(w.double().norm() ** 2 for w in base.values())
        )
        assert 1e-3 <= change <= 1e-2  # real supervised fine-tuning's range
        logged = re.search(r"\|\| = ([\d.e+-]+) \(per matrix", line)[1]
        assert line.startswith(f"{name}: ") and f"{change:.1e}" == logged


def test_the_models_are_readable_as_the_umask_allows(trio):
    paths, _ = trio
    umask = os.umask(0)
    os.umask(umask)
    for folder in paths.values():  # safetensors alone would write 0600
        modes = {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert modes == {0o666 & ~umask}, folder
