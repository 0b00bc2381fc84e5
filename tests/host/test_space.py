"""Full disks, before and during: a merge (a map, a comparison) too big for its
disk is refused before any scoring, in one line naming the folder, the bytes
needed and the bytes free; a disk that fills up while writing anyway ends the
run in one line, nothing published, an earlier output unchanged, no staging.

Tested on a real small filesystem (a tmpfs) where the test may mount one, and
otherwise by faking the free-space call and the write error."""

import errno
import shutil
import struct
import subprocess
import uuid
from collections import namedtuple
from pathlib import Path

import pytest
import safetensors.torch
from click.testing import CliRunner
from mergekit.options import MergeOptions
from mergekit.scripts.run_yaml import main as mergekit_yaml
from safetensors import SafetensorError

from ner_merge.cli import main as ner_merge_cli
from ner_merge.errors import DiskFullError, OutputError
from ner_merge.evaluate.compare import compare
from ner_merge.evaluate.perplexity import DEMO_TEXTS
from ner_merge.host import space
from ner_merge.host.space import (
    FIXED_ALLOWANCE,
    is_disk_full,
    map_bytes,
    merge_bytes,
    tensor_bytes,
)
from ner_merge.models import cache_folder
from ner_merge.models.inventory import localized_config, output_tensors, resolve_models
from ner_merge.recipe.recipe import Recipe
from tests.helpers import run_merge, snapshot, write_recipe

DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
Usage = namedtuple("Usage", "total used free")


def _stored_data_bytes(folder: Path) -> int:
    """The tensor data in a folder's safetensors files, from the file format
    alone: each file's size less its 8-byte length prefix and its header."""
    total = 0
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as file:
            (header,) = struct.unpack("<Q", file.read(8))
        total += shard.stat().st_size - 8 - header
    return total


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _needed(recipe_path: Path) -> int:
    recipe = Recipe.from_file(recipe_path)
    models = resolve_models(recipe)
    return merge_bytes(localized_config(recipe, models), models, MergeOptions())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", None])
def test_the_size_is_exact_for_the_tensors_and_bounds_the_folder(
    tmp_path, qwen_trio, dtype
):
    recipe = write_recipe(
        tmp_path / "r.yml",
        qwen_trio["base"],
        [qwen_trio["one"], qwen_trio["two"]],
        dtype=dtype,
    )
    out = tmp_path / "out"
    run_merge(recipe, out)
    loaded = Recipe.from_file(recipe)
    models = resolve_models(loaded)
    config = localized_config(loaded, models)
    tensors = output_tensors(config, models, MergeOptions())
    data = sum(tensor_bytes(tensor, models, config) for tensor in tensors)
    assert data == _stored_data_bytes(out)  # exact, in the dtype written
    needed = _needed(recipe)
    written = _folder_bytes(out)
    assert written <= needed <= written + FIXED_ALLOWANCE + map_bytes(len(tensors), 3)


def _fake_free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(
        space.shutil, "disk_usage", lambda path: Usage(free * 2, free, free)
    )


def test_too_little_room_is_refused_before_scoring(
    tmp_path, qwen_trio, monkeypatch, isolated_score_cache
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    out = tmp_path / "out"
    run_merge(recipe, out)  # an earlier merge, to be kept
    for entry in isolated_score_cache.rglob("*"):  # every score forgotten
        if entry.is_file():
            entry.unlink()
    before = snapshot(tmp_path)
    needed = _needed(recipe)
    _fake_free(monkeypatch, needed - 1)
    with pytest.raises(OutputError) as refused:
        run_merge(recipe, out)
    assert str(refused.value) == (
        f"OUT {out}: needs {needed:,} bytes ({needed / 1e9:.2f} GB) free on its "
        f"disk, which has {needed - 1:,} bytes ({(needed - 1) / 1e9:.2f} GB); free "
        "some space there or choose another place"
    )
    assert snapshot(tmp_path) == before  # the earlier OUT as it was; no staging
    assert not list(isolated_score_cache.rglob("*.json"))  # nothing scored
    _fake_free(monkeypatch, needed)  # exactly enough: merged
    run_merge(recipe, out)


def _merge_with_mergekit_yaml(recipe: Path, out: Path):
    """mergekit-yaml in this process (the hook's wrap included): exit code and
    what it printed."""
    result = CliRunner().invoke(mergekit_yaml, [str(recipe), str(out), "--quiet"])
    return result.exit_code, result.output


def test_a_disk_filling_while_writing_is_one_line_and_publishes_nothing(
    tmp_path, qwen_trio, monkeypatch
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    out = tmp_path / "out"
    run_merge(recipe, out)
    before = snapshot(tmp_path)

    def full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)  # what safetensors raises then

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, said = _merge_with_mergekit_yaml(recipe, out)
    assert code == 1
    assert said.splitlines() == [
        f"Error: OUT {out}: its disk filled up while the merge was written; "
        "nothing was published and the earlier OUT is unchanged. Free some space "
        "there (the merge's size was checked before it started: another writer "
        "or a quota took it) and run again"
    ]
    assert snapshot(tmp_path) == before  # no staging, OUT byte-identical
    with pytest.raises(DiskFullError, match="no OUT was created"):
        run_merge(recipe, tmp_path / "new")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (SafetensorError(DISK_FULL), True),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (RuntimeError("Unimplemented merge method ner"), False),
    ],
)
def test_what_counts_as_a_full_disk(error, full):
    assert is_disk_full(error) == full
    try:  # and as the cause of another error
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("while writing a shard") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer) == full


# --- a real small filesystem ----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes; skipped where the test may
    not mount one (not root, or no mount in this container)."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
        )
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(where)
        return where

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_on_a_real_small_disk(tmp_path, qwen_trio, small_disk, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    needed = _needed(recipe)
    disk = small_disk(needed + (64 << 10))
    out = disk / "out"
    run_merge(recipe, out)  # the check passes on a disk just big enough
    written = snapshot(disk)
    free = shutil.disk_usage(disk).free  # the earlier OUT stays until publish
    assert free < needed
    with pytest.raises(OutputError, match=f"which has {free:,} bytes"):
        run_merge(recipe, out)
    assert snapshot(disk) == written

    # Another writer takes the room after the check: the write itself fails.
    (disk / "filler").write_bytes(b"x" * (free - (32 << 10)))
    written = snapshot(disk)
    monkeypatch.setattr(space, "free_bytes", lambda path: needed)
    code, said = _merge_with_mergekit_yaml(recipe, out)
    assert code == 1
    assert said.splitlines() == [
        f"Error: OUT {out}: its disk filled up while the merge was written; "
        "nothing was published and the earlier OUT is unchanged. Free some space "
        "there (the merge's size was checked before it started: another writer "
        "or a quota took it) and run again"
    ]
    assert snapshot(disk) == written  # the earlier OUT unchanged, no staging
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "out"]


# --- plan -o and compare's DIR ---------------------------------------------------


def _plan(recipe: Path, output: Path):
    result = CliRunner().invoke(
        ner_merge_cli, ["plan", str(recipe), "-o", str(output), "--quiet"]
    )
    return result.exit_code, result.output


def test_a_map_without_room_is_refused_before_scoring(
    tmp_path, qwen_trio, monkeypatch, isolated_score_cache
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    _fake_free(monkeypatch, 100)
    code, said = _plan(recipe, tmp_path / "maps" / "plan.json")
    assert code == 1
    assert said.startswith(f"Error: -o {tmp_path / 'maps' / 'plan.json'}: needs ")
    assert "which has 100 bytes" in said and len(said.splitlines()) == 1
    assert not (tmp_path / "maps").exists()
    assert not list(isolated_score_cache.rglob("*.json"))  # nothing scored


class _FullDiskFile:
    """A file whose writes fail as on a full disk."""

    def __init__(self, path, *args, **kwargs):
        self.real = open(path, *args, **kwargs)

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def test_a_map_write_that_fills_the_disk_keeps_the_earlier_map(
    tmp_path, qwen_trio, monkeypatch
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    target = tmp_path / "plan.json"
    assert _plan(recipe, target)[0] == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(cache_folder, "open", _FullDiskFile, raising=False)
    code, said = _plan(recipe, target)
    assert code == 1
    assert said.splitlines() == [
        f"Error: -o {target}: its disk filled up while the map was written; "
        "nothing was written and the earlier map is unchanged. Free some space "
        "there and plan again"
    ]
    assert snapshot(tmp_path) == before  # no temporary file left either


def test_a_comparison_without_room_is_refused_before_any_merge(
    tmp_path, qwen_trio, monkeypatch, isolated_score_cache
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    one_merge = _needed(recipe)
    loaded = Recipe.from_file(recipe)
    models = resolve_models(loaded)
    config = localized_config(loaded, models)
    linear = merge_bytes(config, models, MergeOptions(), with_report=False)
    _fake_free(monkeypatch, one_merge)  # room for the NER merge, not the average
    with pytest.raises(OutputError, match=f"-o .*: needs {one_merge + linear:,} "):
        compare([str(recipe)], DEMO_TEXTS[:1], str(tmp_path / "cmp"), linear=True)
    assert not (tmp_path / "cmp").exists()
    assert not list(isolated_score_cache.rglob("*.json"))  # nothing scored


def test_a_comparison_that_fills_its_disk_publishes_nothing(
    tmp_path, qwen_trio, monkeypatch
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])

    def full(*args, **kwargs):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DiskFullError) as stopped:
        compare([str(recipe)], DEMO_TEXTS[:1], str(tmp_path / "cmp"))
    assert str(stopped.value).startswith(
        f"-o {tmp_path / 'cmp'}: its disk filled up while the merge was written; "
        "nothing was published and no folder was created."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yml"]
