"""Hub ids resolve offline through a Hugging Face cache, end to end via mergekit-yaml.

The test builds the cache itself in huggingface_hub's layout:
models--org--name/blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>,
refs/<branch or tag> holding the commit.
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path

from tests.helpers import assert_bit_identical_to_sources
from tests.test_merge import MERGEKIT_YAML

ORG = "pico-org"


def add_to_cache(cache: Path, repo: str, folder: Path, refs: list[str]) -> str:
    """Store a model folder as one commit of `repo`; return the commit hash."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in files:
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return commit


def test_hub_ids_merge_offline_and_the_map_names_revisions(tmp_path, qwen_trio):
    cache = tmp_path / "hub"
    commits = {
        name: add_to_cache(cache, f"{ORG}/{name}", qwen_trio[name], ["main", "v1"])
        for name in ("base", "one", "two")
    }
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        "merge_method: ner\n"
        f"base_model: {ORG}/base\n"  # refs/main
        "models:\n"
        f"  - model: {ORG}/one@{commits['one']}\n"  # a commit
        f"  - model: {ORG}/two@v1\n"  # a tag
        "dtype: bfloat16\n"
    )
    out = tmp_path / "out"
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    done = subprocess.run(
        [MERGEKIT_YAML, str(recipe), str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
    source_map = assert_bit_identical_to_sources(out)
    models = {m["name"]: m for m in source_map["models"]}
    assert list(models) == [
        f"{ORG}/base",
        f"{ORG}/one@{commits['one']}",
        f"{ORG}/two@v1",
    ]
    for (name, entry), commit in zip(models.items(), commits.values()):
        assert entry["revision"] == commit, name
        assert entry["path"] == str(
            cache
            / f"models--{ORG}--{name.split('/')[1].split('@')[0]}"
            / "snapshots"
            / commit
        )
    report = (out / "ner_report.md").read_text()
    assert all(commit in report for commit in commits.values())
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
