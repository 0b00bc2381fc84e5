"""Find each model of a recipe on disk and describe it by content.

A model is a local folder or a Hugging Face Hub id (optionally `id@revision`). Hub
ids resolve through huggingface_hub's cache, so `HF_HUB_OFFLINE=1` works with a
filled cache, and the resolved commit is recorded. A model's `content` holds the
exact hash of every tensor (`ner_merge.models.content`), so a source map or cached score
made for one model is never applied to another, nor to a model changed since.
"""

import json
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mergekit.common import ModelPath, ModelReference
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from transformers import PretrainedConfig

from ner_merge.errors import ModelError
from ner_merge.models.cache_folder import default_cache_dir
from ner_merge.models.content import DigestIndex, ModelContent
from ner_merge.models.reader import TensorHeader
from ner_merge.models.torch_archive import read_torch_headers

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
# Fetched only for a repository without safetensors weights, the one case in
# which mergekit reads .bin files (many repositories hold both formats).
HUB_BIN_PATTERNS = ["pytorch_model*.bin"]


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub snapshot: what a machine without the driver's copy of
    the snapshot (a cluster's worker) needs to fetch the very same file."""

    repo_id: str
    revision: str  # the commit the driver resolved
    filename: str  # inside the snapshot

    def local_path(self) -> str:
        """The file in this machine's Hub cache, downloaded there if allowed."""
        import huggingface_hub

        return huggingface_hub.hf_hub_download(
            self.repo_id, self.filename, revision=self.revision
        )


@dataclass(frozen=True)
class Adapter:
    """The PEFT adapter of a LoRA fine-tune (`model: BASE+ADAPTER`), found on disk."""

    name: str  # as the recipe gives it
    path: str  # local folder holding it
    revision: str | None  # Hub commit, None for a local folder
    hash: str  # BLAKE3 over its files (`ner_merge.models.lora`)


@dataclass(frozen=True)
class ResolvedModel:
    """A recipe model found on disk."""

    name: str  # as the recipe gives it
    path: str  # local folder holding its weights
    revision: str | None  # Hub commit, None for a local folder
    # A LoRA fine-tune: its base and adapter; `path` is mergekit's merge of them.
    base: "ResolvedModel | None" = None
    adapter: Adapter | None = None

    @cached_property
    def index(self) -> ShardedTensorIndex:
        """mergekit's map from tensor names to shard files: safetensors shards, or
        pytorch_model.bin ones where a folder has no safetensors weights, as
        mergekit chooses."""
        try:
            return ShardedTensorIndex.from_disk(self.path)
        except Exception as error:  # mergekit, safetensors, torch raise many kinds
            folder = Path(self.path)
            shards = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
            for shard in sorted(shards):
                read_headers(str(shard))  # names a corrupt file exactly
            raise ModelError(
                f"model {self.name}: no weights in {self.path}: {error}"
            ) from None

    @cached_property
    def headers(self) -> dict[str, TensorHeader]:
        """Dtype, shape and place of every tensor, its data unread."""
        headers = {}
        for shard in self.index.shards:
            headers.update(read_headers(os.path.join(self.path, shard.filename)))
        return headers

    @cached_property
    def config(self) -> PretrainedConfig:
        """The model's transformers configuration, or an error naming its file."""
        try:
            return ModelReference.parse(self.path).config()
        except Exception as error:  # transformers raises many kinds here
            raise ModelError(
                f"model {self.name}: cannot read {self.path}/config.json "
                f"({type(error).__name__}: {error})"
            ) from None

    def hub_file(self, path: str) -> HubFile | None:
        """The Hub file behind one of this model's files; None for a local model."""
        if self.revision is None:
            return None
        repo_id = ModelReference.parse(self.name).model.path
        return HubFile(repo_id, self.revision, os.path.relpath(path, self.path))

    @cached_property
    def content(self) -> ModelContent:
        """Every tensor's exact digest (indexed in the score cache's folder)."""
        root = default_cache_dir()
        index = DigestIndex(root) if root is not None else None
        return ModelContent(self.name, self.headers, index)


def read_headers(file_path: str) -> dict[str, TensorHeader]:
    """Every tensor's header in one weights file, by the file's format."""
    if file_path.endswith(".safetensors"):
        return safetensors_headers(file_path)
    return read_torch_headers(file_path)


def safetensors_headers(file_path: str) -> dict[str, TensorHeader]:
    """Every tensor's header in a safetensors file."""
    header, data_start = read_safetensors_header(file_path)
    return {
        name: TensorHeader(
            dtype=info["dtype"],
            shape=tuple(info["shape"]),
            path=file_path,
            start=data_start + info["data_offsets"][0],
            end=data_start + info["data_offsets"][1],
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


def read_safetensors_header(file_path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file, checked against the file's size, and
    the offset where its data start.

    A truncated download or a corrupt file fails here, naming the file, before
    any tensor is scored, rather than deep inside a merge hours later.
    """
    try:
        size = os.path.getsize(file_path)
        with open(file_path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if length > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(file.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        data_size = size - 8 - length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - set(
                info
            ):
                raise ValueError(f"tensor {name} has a malformed header entry")
            if info["data_offsets"][1] > data_size:
                raise ValueError(
                    f"truncated: tensor {name} ends at byte {info['data_offsets'][1]} "
                    f"of the data, which holds {data_size}"
                )
        return header, 8 + length
    except (OSError, struct.error, ValueError, TypeError, IndexError) as error:
        raise ModelError(
            f"{file_path}: not a readable safetensors file ({error})"
        ) from None


def resolve_model(reference: ModelReference) -> ResolvedModel:
    """Find a recipe model locally or in the Hub cache (downloading if allowed).

    A LoRA fine-tune (`BASE+ADAPTER`) is resolved by `ner_merge.models.lora` instead."""
    name = str(reference)
    path, revision = find_folder(f"model {name}", reference.model, HUB_FILE_PATTERNS)
    if revision is not None and not has_safetensors_weights(path):
        # the same commit's .bin files
        pinned = ModelPath(path=reference.model.path, revision=revision)
        path, _ = find_folder(f"model {name}", pinned, HUB_BIN_PATTERNS)
    return ResolvedModel(name=name, path=path, revision=revision)


def find_folder(
    what: str, model: ModelPath, patterns: list[str]
) -> tuple[str, str | None]:
    """A local folder, else a Hub snapshot holding the files matching `patterns`:
    (its folder, the Hub commit or None). `what` names it in errors."""
    path, revision = model.path, model.revision
    if os.path.isdir(path):
        return os.path.abspath(path), None
    spelled_as_folder = os.path.isabs(path) or path.startswith((".", "~"))
    if spelled_as_folder or "\\" in path or path.count("/") != 1:  # not org/name
        raise ModelError(f"{what}: no such folder {os.path.abspath(path)}")
    import huggingface_hub  # only Hub ids need it

    try:
        local = huggingface_hub.snapshot_download(
            path, revision=revision, allow_patterns=patterns
        )
    except Exception as error:  # offline, missing repo, bad revision: all say why
        raise ModelError(
            f"{what}: not a local folder, and the Hub could not provide it "
            f"({type(error).__name__}: {error})"
        ) from None
    return local, os.path.basename(local)


def has_safetensors_weights(folder: str) -> bool:
    """Whether mergekit will read safetensors weights from this folder."""
    weights = os.path.join(folder, "model.safetensors")
    return os.path.exists(weights) or os.path.exists(weights + ".index.json")
