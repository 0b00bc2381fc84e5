"""pytorch_model.bin models: planned one tensor at a time, merged bit-exactly,
hashed like their safetensors twins, and named when damaged.

transformers 5 writes only safetensors (it ignores `safe_serialization=False`),
so `save_bin` writes a folder the way transformers 4 did: `torch.save` of the
state dict, as one file or as shards with `pytorch_model.bin.index.json`.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from ner_merge.errors import ModelError
from ner_merge.host.pipeline import streaming_options
from ner_merge.models import content
from ner_merge.models import resolve as models
from ner_merge.models.resolve import ResolvedModel, resolve_model
from ner_merge.plan import planner
from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from tests.helpers import (
    assert_bit_identical_to_sources,
    load_tensors,
    run_merge,
    write_recipe,
)

MATRIX = "model.layers.1.self_attn.o_proj.weight"


def save_bin(
    source: Path,
    folder: Path,
    shard_bytes: int | None = None,
    edit=lambda tensors: tensors,
) -> Path:
    """The safetensors model folder `source` as a .bin folder: one
    pytorch_model.bin, or shards of at most `shard_bytes` (a tensor never split)
    and their index. `edit` may change the state dict first."""
    folder.mkdir(parents=True)
    for file in source.iterdir():
        if "safetensors" not in file.name:
            shutil.copy(file, folder / file.name)
    tensors = edit(load_tensors(source))
    if shard_bytes is None:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for number, names in enumerate(shards, 1):
        file_name = f"pytorch_model-{number:05d}-of-{len(shards):05d}.bin"
        torch.save({name: tensors[name] for name in names}, folder / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def bin_trio(qwen_trio, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The qwen trio as single-file and as sharded .bin models."""
    root = tmp_path_factory.mktemp("bin-trio")
    return {
        kind: {
            name: save_bin(folder, root / kind / name, shard_bytes)
            for name, folder in qwen_trio.items()
        }
        for kind, shard_bytes in (("single", None), ("sharded", 20_000))
    }


def _fingerprint(folder: Path) -> str:
    return ResolvedModel(folder.name, str(folder), None).content.fingerprint


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_a_bin_trio_plans_like_its_twin_and_merges_bit_exactly(
    tmp_path, qwen_trio, bin_trio, kind
):
    trio = bin_trio[kind]
    if kind == "sharded":
        assert len(list(trio["base"].glob("pytorch_model-*.bin"))) > 2
    recipe = write_recipe(tmp_path / "r.yml", trio["base"], [trio["one"], trio["two"]])
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out)
    twin = plan(
        Recipe.from_file(
            write_recipe(
                tmp_path / "twin.yml",
                qwen_trio["base"],
                [qwen_trio["one"], qwen_trio["two"]],
            )
        ),
        quiet=True,
    )
    # Same tensors, same hashes: same fingerprints, scores and sources.
    fingerprints = [m["fingerprint"] for m in source_map["models"]]
    assert fingerprints == [m.fingerprint for m in twin.models]
    position = {m["name"]: i for i, m in enumerate(source_map["models"])}
    for name, choice in twin.tensors.items():
        mine = source_map["tensors"][name]
        assert position[mine["source"]] == [m.name for m in twin.models].index(
            choice.source
        ), name
        assert list(mine["scores"].values()) == list(choice.scores.values()), name


def test_a_mixed_recipe_merges_bit_exactly(tmp_path, qwen_trio, bin_trio):
    """Base in safetensors, one fine-tune in one .bin, the other in .bin shards."""
    one, two = bin_trio["single"]["one"], bin_trio["sharded"]["two"]
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [one, two])
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out)
    sources = {c["source"] for c in source_map["tensors"].values()}
    assert sources == {str(qwen_trio["base"]), str(one), str(two)}


def test_a_non_contiguous_tensor_hashes_and_merges_like_its_contiguous_twin(
    tmp_path, qwen_trio
):
    """torch.save keeps a view's strides (a transposed copy, say); the digest
    is over the tensor's contiguous bytes, as safetensors stores them."""

    def transposed(tensors):
        tensors[MATRIX] = tensors[MATRIX].t().contiguous().t()
        assert not tensors[MATRIX].is_contiguous()
        return tensors

    strided = save_bin(qwen_trio["one"], tmp_path / "strided", edit=transposed)
    header = ResolvedModel("s", str(strided), None).headers[MATRIX]
    assert header.stride is not None
    assert _fingerprint(strided) == _fingerprint(qwen_trio["one"])
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [strided])
    run_merge(recipe, tmp_path / "out")
    assert_bit_identical_to_sources(tmp_path / "out")


def test_reading_a_tensor_reads_only_its_bytes_in_its_shard(
    tmp_path, bin_trio, monkeypatch
):
    """Headers come from the pickle alone (torch.load, which reads every
    storage, is never called); a tensor read touches only its own bytes."""

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load reads whole shards")

    monkeypatch.setattr(torch, "load", no_torch_load)
    folder = bin_trio["sharded"]["one"]
    model = ResolvedModel("one", str(folder), None)
    shard = json.loads((folder / "pytorch_model.bin.index.json").read_text())[
        "weight_map"
    ][MATRIX]
    reads: list[tuple[str, int]] = []
    real = content.read_bytes

    def counting(header):
        data = real(header)
        reads.append((header.path, len(data)))
        return data

    monkeypatch.setattr(content, "read_bytes", counting)
    tensor = model.content.read(MATRIX)
    assert reads == [(str(folder / shard), tensor.numel() * tensor.element_size())]


def _bytes_read() -> int:
    """Bytes this process has read from files so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="Linux only")
def test_headers_read_a_sliver_of_a_large_file(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    tensors = {f"layer.{i}.weight": torch.randn(1024, 1024) for i in range(8)}
    torch.save(tensors, folder / "pytorch_model.bin")  # 32 MiB
    size = (folder / "pytorch_model.bin").stat().st_size
    ResolvedModel("warm-up", str(folder), None).headers  # noqa: B018 (imports)
    before = _bytes_read()
    headers = ResolvedModel("big", str(folder), None).headers
    assert len(headers) == 8
    # The pickle, the zip directory (found by reading up to 64 KiB from the
    # end, twice) and one local header per storage: a constant, not the data.
    assert _bytes_read() - before < min(2**18, size / 100)


# --- damaged files: named before anything is scored ---------------------------


@pytest.fixture
def no_scoring(monkeypatch):
    def scored(*args, **kwargs):
        raise AssertionError("a damaged model reached scoring")

    monkeypatch.setattr(planner, "score_matrices", scored)


def _plan(tmp_path: Path, base: Path, models: list[Path]) -> None:
    plan(Recipe.from_file(write_recipe(tmp_path / "r.yml", base, models)), quiet=True)


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_a_truncated_bin_is_named(tmp_path, qwen_trio, bin_trio, kind, no_scoring):
    cut = shutil.copytree(bin_trio[kind]["one"], tmp_path / "cut")
    weights = sorted(cut.glob("pytorch_model*.bin"))[-1]
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="truncated") as error:
        _plan(tmp_path, qwen_trio["base"], [cut])
    assert f"{weights}: not a readable PyTorch weights file" in str(error.value)


def test_a_corrupt_bin_is_named(tmp_path, qwen_trio, bin_trio, no_scoring):
    """One byte of the pickle flipped: the zip's CRC catches it."""
    bad = shutil.copytree(bin_trio["single"]["one"], tmp_path / "bad")
    weights = bad / "pytorch_model.bin"
    data = bytearray(weights.read_bytes())
    data[data.index(b"model.layers.0")] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="CRC") as error:
        _plan(tmp_path, qwen_trio["base"], [bad])
    assert str(weights) in str(error.value)


def test_a_missing_shard_is_named(tmp_path, qwen_trio, bin_trio, no_scoring):
    lacking = shutil.copytree(bin_trio["sharded"]["two"], tmp_path / "lacking")
    shard = sorted(lacking.glob("pytorch_model-*.bin"))[0]
    shard.unlink()
    with pytest.raises(ModelError, match=re.escape(f"{shard}: ")):
        _plan(tmp_path, qwen_trio["base"], [lacking])


# --- the Hub ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bin only", "both formats"])
def test_the_hub_fetches_bin_files_only_without_safetensors(
    tmp_path, qwen_trio, bin_trio, monkeypatch, kind
):
    """A .bin-only repository gets its .bin files, of the commit resolved
    first; one that also holds safetensors gets no .bin file (mergekit would
    read the safetensors)."""
    import huggingface_hub

    remote = shutil.copytree(bin_trio["sharded"]["one"], tmp_path / "remote")
    if kind == "both formats":
        shutil.copy(qwen_trio["one"] / "model.safetensors", remote)
    snapshot = tmp_path / "snapshots" / ("c0ffee" * 6 + "abcd")
    calls = []

    def snapshot_download(repo_id, revision, allow_patterns):
        calls.append((revision, allow_patterns))
        snapshot.mkdir(parents=True, exist_ok=True)
        for file in remote.iterdir():
            if any(Path(file.name).match(p) for p in allow_patterns):
                shutil.copy(file, snapshot / file.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = resolve_model(ModelReference.parse("org/name"))
    bins = sorted(p.name for p in snapshot.glob("*.bin"))
    if kind == "bin only":
        assert calls[1] == (snapshot.name, models.HUB_BIN_PATTERNS)
        assert bins == sorted(p.name for p in remote.glob("*.bin"))
        assert model.content.fingerprint == _fingerprint(qwen_trio["one"])
    else:
        assert calls == [(None, models.HUB_FILE_PATTERNS)] and bins == []


def test_a_merge_with_a_bin_model_reads_it_lazily(qwen_trio, bin_trio):
    """mergekit's default reads a .bin whole, again for every tensor."""
    safetensors = [ResolvedModel(n, str(p), None) for n, p in qwen_trio.items()]
    assert not streaming_options(MergeOptions(), safetensors).lazy_unpickle
    mixed = safetensors[:2] + [
        ResolvedModel("two", str(bin_trio["single"]["two"]), None)
    ]
    assert streaming_options(MergeOptions(), mixed).lazy_unpickle
