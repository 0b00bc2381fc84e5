"""OUT is never a place to lose data: refused before any scoring when it holds
anything a merge did not write, locked for the run, and published recoverably."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from ner_merge.errors import OutputError
from ner_merge.host import output
from ner_merge.host.output import MANIFEST_FILE, OutputFolder
from ner_merge.models.cache_folder import CACHE_DIR_VARIABLE
from tests.helpers import (
    assert_bit_identical_to_sources,
    run_merge,
    snapshot,
    write_recipe,
)

MERGEKIT_YAML = str(Path(sys.executable).parent / "mergekit-yaml")


@pytest.fixture
def workspace(tmp_path, qwen_trio, monkeypatch) -> Path:
    """A user's folder holding copies of the models and a recipe, as cwd."""
    for name in ("base", "one"):
        shutil.copytree(qwen_trio[name], tmp_path / "models" / name)
    (tmp_path / "thesis.tex").write_text("months of work")
    monkeypatch.chdir(tmp_path)
    write_recipe(
        tmp_path / "recipe.yml", tmp_path / "models/base", [tmp_path / "models/one"]
    )
    return tmp_path


def _refused(workspace: Path, out: str, says: str, isolated_score_cache: Path):
    before = snapshot(workspace)
    with pytest.raises(OutputError, match=says):
        run_merge(workspace / "recipe.yml", Path(out))
    assert snapshot(workspace) == before  # nothing deleted, nothing written
    assert not list(isolated_score_cache.rglob("*.json"))  # refused before scoring


@pytest.mark.parametrize(
    "out, says",
    [
        (".", "is the current folder or holds it"),
        ("..", "is the current folder or holds it"),
        ("models/one", "is input model"),
        ("models/one/merged", "lies in input model"),
        ("models", "holds input model"),
        ("thesis.tex", "is a file"),
    ],
)
def test_an_out_that_would_destroy_inputs_is_refused(
    workspace, out, says, isolated_score_cache
):
    _refused(workspace, out, says, isolated_score_cache)


def test_an_out_holding_unrelated_files_is_refused(workspace, isolated_score_cache):
    (workspace / "papers" / "src").mkdir(parents=True)
    (workspace / "papers" / "src" / "main.py").write_text("print()")
    _refused(workspace, "papers", "is not a merge's output", isolated_score_cache)


def test_a_previous_merge_is_replaced_but_not_one_with_files_added(
    workspace, isolated_score_cache
):
    out = workspace / "out"
    run_merge(workspace / "recipe.yml", out)
    assert (out / MANIFEST_FILE).exists()
    run_merge(workspace / "recipe.yml", out)  # our own output: replaced
    assert_bit_identical_to_sources(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        run_merge(workspace / "recipe.yml", out)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_empty_out_is_used(workspace):
    (workspace / "out").mkdir()
    run_merge(workspace / "recipe.yml", workspace / "out")
    assert_bit_identical_to_sources(workspace / "out")


def test_a_symlinked_out_is_followed(workspace):
    (workspace / "disk").mkdir()
    (workspace / "out").symlink_to(workspace / "disk" / "merged")
    run_merge(workspace / "recipe.yml", workspace / "out")
    assert (workspace / "out").is_symlink()
    assert_bit_identical_to_sources(workspace / "disk" / "merged")


def test_a_second_merge_into_a_locked_out_stops_at_once(workspace):
    lock = workspace / ".out.ner-lock"
    with FileLock(lock):  # as a running merge holds it
        with pytest.raises(OutputError, match="another merge is writing it"):
            run_merge(workspace / "recipe.yml", workspace / "out")
    assert not (workspace / "out").exists()
    run_merge(workspace / "recipe.yml", workspace / "out")  # free again
    assert not lock.exists()  # the run removed the lock file it made


def test_a_refused_run_writes_nothing_anywhere(workspace, monkeypatch):
    """An OUT that is not ours (the user's /root, say) is refused before a lock
    file is made beside it, and before the score cache's folder is created."""
    cache = workspace.parent / f"{workspace.name}-cache" / "not-yet"
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(cache))
    locks = []
    monkeypatch.setattr(
        output, "FileLock", lambda path: locks.append(path) or FileLock(path)
    )
    (workspace / "home").mkdir()
    (workspace / "home" / ".bashrc").write_text("mine")
    before = snapshot(workspace)
    with pytest.raises(OutputError, match="is not a merge's output"):
        run_merge(workspace / "recipe.yml", workspace / "home")
    assert locks == []
    assert not cache.parent.exists()
    assert snapshot(workspace) == before


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from ner_merge.host import output

real = Path.rename
def rename(self, target):
    real(self, target)
    if Path(target).name == output.PREVIOUS:  # OUT moved aside, new one not yet in
        os.kill(os.getpid(), signal.SIGKILL)
Path.rename = rename
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


def test_a_publish_cut_short_between_renames_is_finished(workspace):
    out = workspace / "out"
    recipe = str(workspace / "recipe.yml")
    done = subprocess.run([MERGEKIT_YAML, recipe, str(out)], capture_output=True)
    assert done.returncode == 0, done.stderr
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN_RENAMES, recipe, str(out)],
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()  # both merges now lie in the staging folder
    staging = workspace / ".out.ner-partial"
    assert sorted(os.listdir(staging)) == ["out", "previous"]
    folder = OutputFolder(str(out), [])
    with folder.prepared():  # the next run finishes the publish first
        assert (out / MANIFEST_FILE).exists() and not staging.exists()
    assert_bit_identical_to_sources(out)


def test_an_unfinished_publish_is_rolled_back(workspace):
    out = workspace / "out"
    run_merge(workspace / "recipe.yml", out)
    before = snapshot(out)
    staging = workspace / ".out.ner-partial"
    staging.mkdir()
    out.rename(staging / "previous")  # OUT moved aside, the new merge half-written
    (staging / "out").mkdir()
    (staging / "out" / "model-00001-of-00002.safetensors").write_bytes(b"half")
    with OutputFolder(str(out), []).prepared():
        assert snapshot(out) == before and not staging.exists()


def test_a_staging_folder_with_foreign_files_is_left_alone(workspace):
    staging = workspace / ".out.ner-partial"
    staging.mkdir()
    (staging / "diary.txt").write_text("not a merge's")
    with pytest.raises(OutputError, match="diary.txt"):
        run_merge(workspace / "recipe.yml", workspace / "out")
    assert (staging / "diary.txt").read_text() == "not a merge's"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_published_file_has_the_users_umask(workspace, umask):
    """safetensors creates its files 0600; a merge is published as the user's
    umask says, so a group can read a shared model folder (or not)."""
    previous = os.umask(umask)
    try:
        run_merge(workspace / "recipe.yml", workspace / "out")
    finally:
        os.umask(previous)
    modes = {
        str(path.relative_to(workspace / "out")): path.stat().st_mode & 0o777
        for path in (workspace / "out").rglob("*")
    }
    assert "model.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)
