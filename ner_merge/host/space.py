"""Disk space: how many bytes a merge will write, how many are free, and
whether an error was the disk filling up.

A merge's size is known before any model is scored: its tensors' shapes and
output dtype give their bytes exactly, and the rest is small and bounded (the
shard headers, the base's configuration and tokenizer files mergekit copies,
the source map, report and card we add). The staged merge is written beside
OUT, on OUT's disk, while an earlier OUT stays until the publish: so the whole
merge must fit in what is free now, the earlier OUT still counted as used.

Nothing here reads a tensor: headers, file sizes and one free-space call.
"""

import errno
import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from ner_merge.errors import OutputError
from ner_merge.models.inventory import OutputTensor, output_tensors
from ner_merge.models.reader import DTYPES
from ner_merge.models.resolve import ResolvedModel
from ner_merge.models.vocabulary import vocabulary_alignment

# Per file a safetensors shard holds besides its tensors' entries: the length
# prefix, `{"__metadata__":{"format":"pt"}}` and padding to 8 bytes, rounded up.
SHARD_FILE_OVERHEAD = 128
# The longest dtype name a safetensors header may hold ("F8_E4M3").
LONGEST_DTYPE_NAME = max(len(name) for name in DTYPES)
# Per tensor in a pytorch_model.bin (safe_serialization off): its zip record's
# header, central directory entry, alignment padding and pickle, rounded up.
BIN_TENSOR_OVERHEAD = 1024
# Base files mergekit copies or rewrites into a merge: configuration,
# generation config, tokenizer, chat template, and any custom code.
COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py")
# What we write beside the weights, bounded: the source map and report grow
# with the tensors and models; the report's figure, the model card and the
# manifest are smaller than this allowance.
PER_TENSOR_TEXT = 1024
PER_TENSOR_AND_MODEL_TEXT = 256
FIXED_ALLOWANCE = 4 << 20


def merge_bytes(
    config: MergeConfiguration,
    models: list[ResolvedModel],
    options: MergeOptions,
    with_report: bool = True,
) -> int:
    """The most bytes the merge of `config` (its models resolved as `models`,
    base first) writes into its output folder.

    Exact for the tensors' data; an upper bound for the rest. `with_report`:
    an NER merge, which adds its source map and report.
    """
    vocabulary = vocabulary_alignment(config, options)
    tensors = output_tensors(config, models, options, vocabulary)
    data = sum(tensor_bytes(tensor, models, config) for tensor in tensors)
    if options.safe_serialization:
        headers = sum(_header_entry_bytes(tensor, data) for tensor in tensors)
        # at most one shard per tensor, and an index naming every tensor's shard
        headers += len(tensors) * SHARD_FILE_OVERHEAD + _index_bytes(tensors, data)
    else:
        headers = len(tensors) * BIN_TENSOR_OVERHEAD
    copied = sum(_copied_file_sizes(models[0].path))
    ours = FIXED_ALLOWANCE
    if with_report:
        ours += map_bytes(len(tensors), len(models))
    return data + headers + copied + ours


def map_bytes(tensors: int, models: int) -> int:
    """The most bytes a source map (or a report) of this many tensors takes."""
    return tensors * (PER_TENSOR_TEXT + models * PER_TENSOR_AND_MODEL_TEXT)


def tensor_bytes(
    tensor: OutputTensor, models: list[ResolvedModel], config: MergeConfiguration
) -> int:
    """The bytes of one output tensor's data, in the dtype mergekit writes it:
    the architecture's forced dtype, else the recipe's `out_dtype`, else its
    `dtype` (every copy is cast to it on loading), else the copy's own (the
    widest, as the copy taken is not known yet)."""
    name = tensor.force_dtype or config.out_dtype or config.dtype
    if name:
        size = dtype_from_name(name).itemsize
    else:
        size = max(
            DTYPES[model.headers[stored].dtype].itemsize
            for model, stored in zip(models, tensor.stored_names)
            if stored is not None
        )
    return math.prod(tensor.shape) * size


def _header_entry_bytes(tensor: OutputTensor, data: int) -> int:
    """The tensor's entry in a safetensors header, with offsets as long as the
    largest the data allow."""
    entry = {
        tensor.name: {
            "dtype": "X" * LONGEST_DTYPE_NAME,
            "shape": list(tensor.shape),
            "data_offsets": [data, data],
        }
    }
    return len(json.dumps(entry, separators=(",", ":")))


def _index_bytes(tensors: list[OutputTensor], data: int) -> int:
    """The shard index: every tensor's name and shard file, indented as
    mergekit writes it."""
    shard = "model-00000-of-00000.safetensors"
    weight_map = {tensor.name: shard for tensor in tensors}
    document = {"metadata": {"total_size": data, "mergekit_version": "9" * 16}}
    return len(json.dumps(document | {"weight_map": weight_map}, indent=2)) + 64


def _copied_file_sizes(base: str) -> Iterable[int]:
    """Sizes of the base's files a merge may copy or rewrite (a superset of
    mergekit's list: it copies only those it knows)."""
    for entry in os.scandir(base):
        if entry.is_file() and entry.name.endswith(COPIED_SUFFIXES):
            if not entry.name.endswith(".index.json"):  # the weights' own index
                yield entry.stat().st_size


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the disk that holds `path` (which may not
    exist yet: its nearest existing folder is asked)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_room(path: Path, needed: int, named: str) -> None:
    """Refuse, in one line naming the folder or file, what would not fit."""
    free = free_bytes(path)
    if needed > free:
        raise OutputError(
            f"{named}: needs {_size(needed)} free on its disk, which has "
            f"{_size(free)}; free some space there or choose another place"
        )


def _size(count: int) -> str:
    return f"{count:,} bytes ({count / 1e9:.2f} GB)"


# What the disk filling up says: as an OSError's number, or in the text of an
# error that lost it (safetensors' Rust writer raises "...No space left on
# device (os error 28)"; on Windows the system's text differs).
DISK_FULL_ERRNOS = {errno.ENOSPC} | {getattr(errno, "EDQUOT", errno.ENOSPC)}
DISK_FULL_TEXTS = {os.strerror(number) for number in DISK_FULL_ERRNOS} | {
    "There is not enough space on the disk",  # Windows' ERROR_DISK_FULL
    "StorageFull",  # Rust's io::ErrorKind names
    "QuotaExceeded",
}


def is_disk_full(error: BaseException) -> bool:
    """Whether an error, or one it came from, is the disk (or a quota) full."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False
