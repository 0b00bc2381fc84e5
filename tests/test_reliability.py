"""Bad input is caught early and named; failures leave nothing that looks done."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ner_merge.errors import ModelError, SourceMapError
from ner_merge.models.cache_folder import CACHE_DIR_VARIABLE
from ner_merge.plan.planner import plan
from ner_merge.plan.source_map import SourceMap
from ner_merge.recipe.recipe import Recipe
from ner_merge.scoring.ner import normalized_effective_rank
from tests import pico
from tests.helpers import (
    RANK1_TENSOR,
    assert_bit_identical_to_sources,
    run_merge,
    write_recipe,
)

MERGEKIT_YAML = str(Path(sys.executable).parent / "mergekit-yaml")
MATRIX = "model.layers.1.self_attn.o_proj.weight"


def edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of a model folder whose weights pass through `edit(dict)`."""
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return target


def plan_of(tmp_path: Path, base: Path, models: list[Path], **options) -> SourceMap:
    recipe = write_recipe(tmp_path / "recipe.yml", base, models, **options)
    return plan(Recipe.from_file(recipe), quiet=True)


# --- models that cannot be merged: caught before any tensor is scored ---------


def test_unknown_architecture_is_named(tmp_path, qwen_trio):
    odd = shutil.copytree(qwen_trio["one"], tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config.update(architectures=["NoSuchModelForCausalLM"], model_type="no_such_type")
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="no_such_type") as error:
        plan_of(tmp_path, qwen_trio["base"], [odd])
    assert str(odd / "config.json") in str(error.value)


def test_layer_count_mismatch_is_named(tmp_path, qwen_trio):
    deeper = pico.save_model(
        pico.base_model("qwen2", num_hidden_layers=3), tmp_path / "deeper"
    )
    with pytest.raises(ModelError, match="layer counts differ") as error:
        plan_of(tmp_path, qwen_trio["base"], [deeper])
    assert f"({qwen_trio['base']}: 2, {deeper}: 3)" in str(error.value)


def test_truncated_weights_are_named_before_scoring(tmp_path, qwen_trio):
    cut = shutil.copytree(qwen_trio["one"], tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="truncated") as error:
        plan_of(tmp_path, qwen_trio["base"], [cut])
    assert str(weights) in str(error.value)


def test_garbage_weights_are_named(tmp_path, qwen_trio):
    junk = shutil.copytree(qwen_trio["one"], tmp_path / "junk")
    weights = junk / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelError, match="not a readable safetensors file") as error:
        plan_of(tmp_path, qwen_trio["base"], [junk])
    assert str(weights) in str(error.value)


# --- odd values ----------------------------------------------------------------


def _poison(tensors):
    tensors[MATRIX][0, 0] = float("nan")


def test_nan_is_an_error_naming_model_and_tensor(tmp_path, qwen_trio):
    bad = edited_copy(qwen_trio["one"], tmp_path / "bad", _poison)
    with pytest.raises(ModelError) as error:
        plan_of(tmp_path, qwen_trio["base"], [bad])
    message = str(error.value)
    assert str(bad) in message and MATRIX in message and "nonfinite: lose" in message


def test_nan_copy_loses_when_asked(tmp_path, qwen_trio):
    bad = edited_copy(qwen_trio["one"], tmp_path / "bad", _poison)
    source_map = plan_of(tmp_path, qwen_trio["base"], [bad], nonfinite="lose")
    choice = source_map.tensors[MATRIX]
    assert choice.scores[str(bad)] is None and choice.source == str(qwen_trio["base"])
    json.loads(source_map.to_json())  # null, not NaN: still standard JSON


def test_zero_and_constant_matrices_score_zero_and_lose(tmp_path, qwen_trio):
    assert normalized_effective_rank(torch.full((8, 5), 3.0)) == 0.0

    def flatten(tensors):
        tensors[MATRIX] = torch.zeros_like(tensors[MATRIX])
        tensors[RANK1_TENSOR] = torch.full_like(tensors[RANK1_TENSOR], 0.5)

    flat = edited_copy(qwen_trio["two"], tmp_path / "flat", flatten)
    source_map = plan_of(tmp_path, flat, [qwen_trio["base"]])
    for name in (MATRIX, RANK1_TENSOR):
        assert source_map.tensors[name].scores[str(flat)] == 0.0
        assert source_map.tensors[name].source == str(qwen_trio["base"])


# --- source maps edited by hand --------------------------------------------------


@pytest.fixture(scope="module")
def planned(tmp_path_factory, qwen_trio):
    folder = tmp_path_factory.mktemp("planned")
    models = [qwen_trio["one"], qwen_trio["two"]]
    source_map = plan_of(folder, qwen_trio["base"], models)
    path = folder / "map.json"
    source_map.save(path)
    return folder, path, models


def _merge_with_map(tmp_path, qwen_trio, models, document) -> Path:
    map_path = tmp_path / "edited.json"
    map_path.write_text(json.dumps(document))
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], models, source_map=str(map_path)
    )
    run_merge(recipe, tmp_path / "out")
    return tmp_path / "out"


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda d: d["tensors"][MATRIX].update(source="who/else"), "who/else"),
        (lambda d: d["tensors"].pop(MATRIX), MATRIX),
        (lambda d: d["tensors"].update(extra=d["tensors"][MATRIX]), "extra"),
        (lambda d: d["models"].pop(0), "exactly one model must have role 'base'"),
        (lambda d: d.update(format_version=9), "format_version"),
    ],
    ids=[
        "unknown-model",
        "missing-tensor",
        "unknown-tensor",
        "other-models",
        "version",
    ],
)
def test_bad_hand_edits_are_named(tmp_path, qwen_trio, planned, edit, says):
    _, path, models = planned
    document = json.loads(path.read_text())
    edit(document)
    with pytest.raises(SourceMapError, match=says) as error:
        _merge_with_map(tmp_path, qwen_trio, models, document)
    assert str(tmp_path / "edited.json") in str(error.value)
    assert not (tmp_path / "out").exists()


def test_map_for_other_models_is_refused(tmp_path, qwen_trio, planned):
    _, path, models = planned
    document = json.loads(path.read_text())
    document["models"][1]["fingerprint"] = "0" * 64  # another model's content
    text = json.dumps(document).replace(str(models[1]), str(tmp_path / "elsewhere"))
    with pytest.raises(SourceMapError, match="since the map was made"):
        _merge_with_map(tmp_path, qwen_trio, models, json.loads(text))


def test_map_for_changed_models_is_refused(tmp_path, qwen_trio):
    changing = shutil.copytree(qwen_trio["one"], tmp_path / "changing")
    source_map = plan_of(tmp_path, qwen_trio["base"], [changing])
    shutil.copy(qwen_trio["two"] / "model.safetensors", changing / "model.safetensors")
    with pytest.raises(SourceMapError, match="has changed"):
        _merge_with_map(
            tmp_path, qwen_trio, [changing], source_map.model_dump(mode="json")
        )


def test_deliberate_override_is_honoured_and_reported(tmp_path, qwen_trio, planned):
    _, path, models = planned
    document = json.loads(path.read_text())
    matrix = "model.layers.0.self_attn.v_proj.weight"
    choice = document["tensors"][matrix]
    loser = min(choice["scores"], key=choice["scores"].get)
    choice["source"] = loser
    out = _merge_with_map(tmp_path, qwen_trio, models, document)
    source_map = assert_bit_identical_to_sources(out)
    assert source_map["tensors"][matrix]["rule"] == "override"
    assert source_map["tensors"][matrix]["source"] == loser
    bias = source_map["tensors"]["model.layers.0.self_attn.v_proj.bias"]
    assert bias["source"] == loser  # the projection stays whole
    assert f"| `{matrix}` |" in (out / "ner_report.md").read_text()
    assert "override" in (out / "ner_report.md").read_text()


# --- atomic output -------------------------------------------------------------


def test_failed_merge_leaves_no_output(tmp_path, qwen_trio, monkeypatch):
    import ner_merge.host.method

    def broken(*_args):
        raise OSError("disk on fire")

    monkeypatch.setattr(ner_merge.host.method, "load_cached", broken)
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    with pytest.raises(OSError, match="disk on fire"):
        run_merge(recipe, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]


@pytest.fixture(scope="module")
def medium_trio(tmp_path_factory) -> list[Path]:
    """Models big enough that a merge written in 1 MB shards takes a moment."""
    root = tmp_path_factory.mktemp("medium")
    base = pico.base_model(
        "qwen2", hidden_size=256, intermediate_size=1024, num_hidden_layers=8
    )
    one = pico.fine_tune(base, seed=1)
    return [pico.save_model(base, root / "base"), pico.save_model(one, root / "one")]


def _kill_mid_merge(recipe: Path, out: Path) -> None:
    """Start mergekit-yaml, SIGKILL it once it has written a shard."""
    staging = out.parent / f".{out.name}.ner-partial" / out.name
    process = subprocess.Popen(
        [MERGEKIT_YAML, str(recipe), str(out), "--out-shard-size", "1M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(staging.glob("*.safetensors")):
        assert process.poll() is None, "merge ended before it could be killed"
        assert time.monotonic() < deadline, "merge never started writing"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # it died of the kill, not by itself


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_killed_merge_leaves_out_absent_or_untouched(tmp_path, medium_trio):
    recipe = write_recipe(tmp_path / "r.yml", medium_trio[0], medium_trio[1:])
    out = tmp_path / "out"
    _kill_mid_merge(recipe, out)
    assert not out.exists()

    done = subprocess.run([MERGEKIT_YAML, str(recipe), str(out)], capture_output=True)
    assert done.returncode == 0, done.stderr
    before = _digest(out)
    _kill_mid_merge(recipe, out)  # a second merge into a finished one, cut short
    assert _digest(out) == before

    done = subprocess.run([MERGEKIT_YAML, str(recipe), str(out)], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]
    assert_bit_identical_to_sources(out)


# --- determinism -----------------------------------------------------------------


def test_two_runs_of_the_demo_recipe_are_byte_identical(tmp_path, qwen_trio):
    """Two processes (different hash seeds: set orders differ) give equal bytes."""
    recipe = yaml.safe_load(Path("configs/tiny-ner.yml").read_text())
    recipe["base_model"] = str(qwen_trio["base"])
    recipe["models"] = [{"model": str(qwen_trio[n])} for n in ("one", "two")]
    path = tmp_path / "tiny-ner.yml"
    path.write_text(yaml.safe_dump(recipe))
    digests, caches = [], []
    for seed in ("1", "2"):
        out = tmp_path / seed / "merged"  # one folder name: the model card quotes it
        cache = tmp_path / seed / "score-cache"  # empty: each run scores afresh
        done = subprocess.run(
            [MERGEKIT_YAML, str(path), str(out), "--quiet"],
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": seed, CACHE_DIR_VARIABLE: str(cache)},
        )
        assert done.returncode == 0, done.stderr
        report = out / "ner_report.md"
        lines = report.read_text().splitlines()
        assert sum(line.startswith("Created: ") for line in lines) == 1
        report.write_text("\n".join(x for x in lines if not x.startswith("Created: ")))
        digests.append(_digest(out))
        caches.append(_digest(cache))
    assert all(caches)  # each run scored, into its own cache
    assert digests[0] == digests[1]
    assert {"model.safetensors", "ner_source_map.json", "README.md"} <= set(digests[0])


def test_plans_do_not_depend_on_the_run(tmp_path, qwen_trio, monkeypatch):
    models = [qwen_trio["one"], qwen_trio["two"]]
    plans, caches = [], []
    for run in ("first", "second"):
        cache = tmp_path / run / "score-cache"  # empty: each plan scores afresh
        monkeypatch.setenv(CACHE_DIR_VARIABLE, str(cache))
        plans.append(plan_of(tmp_path, qwen_trio["base"], models).to_json())
        caches.append(_digest(cache))
    assert all(caches)  # each run scored, into its own cache
    assert plans[0] == plans[1]


# --- the bit-identity check itself -----------------------------------------------

EMBEDDING = "model.embed_tokens.weight"


def _claimed_copy(tmp_path: Path, base: Path, edit) -> Path:
    """An output folder whose map says every tensor comes from `base` unchanged,
    with its weights passed through `edit(dict)`."""
    out = edited_copy(base, tmp_path / "out", edit)
    tensors = load_file(out / "model.safetensors")
    document = {
        "models": [{"name": "base", "path": str(base), "role": "base"}],
        "tensors": {name: {"source": "base"} for name in tensors},
    }
    (out / "ner_source_map.json").write_text(json.dumps(document))
    return out


def _cut(name: str, rows=slice(None), columns=slice(None)):
    return lambda tensors: tensors.update(
        {name: tensors[name][rows, columns].contiguous()}
    )


@pytest.mark.parametrize(
    "edit, accepted",
    [
        (lambda tensors: None, True),
        (_cut(EMBEDDING, rows=slice(-3)), True),  # tokens dropped by a tokenizer option
        (_cut(EMBEDDING, rows=slice(3, None)), False),  # not its first rows
        (_cut(EMBEDDING, columns=slice(-1)), False),  # not along the token axis
        (_cut(MATRIX, rows=slice(-1)), False),  # not token-indexed
    ],
    ids=["whole", "first-tokens", "last-tokens", "hidden-axis", "not-token-indexed"],
)
def test_bit_identity_check_cuts_only_token_indexed_tensors_along_tokens(
    tmp_path, qwen_trio, edit, accepted
):
    out = _claimed_copy(tmp_path, qwen_trio["base"], edit)
    if accepted:
        assert_bit_identical_to_sources(out)
    else:
        with pytest.raises(AssertionError):
            assert_bit_identical_to_sources(out)
