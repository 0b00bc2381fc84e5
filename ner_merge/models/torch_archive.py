"""Where each tensor of a `pytorch_model.bin` lies, found without reading any.

torch.save writes a zip archive: `PREFIX/data.pkl` pickles the state dict, each
tensor naming a storage record `PREFIX/data/KEY` with an element offset, a shape
and strides; the records are stored uncompressed. torch.load would read every
storage (a whole model, or shard, in memory). Here the pickle is read with
mergekit's lazy unpickler, which admits only the classes a state dict needs and
turns each storage into a `DeferredLoad` holding no data, and each record's data
is found in the file from the zip directory and the record's local header. Every
tensor is then a byte range of the file, read alone like a safetensors tensor
(`ner_merge.models.reader`).
"""

import math
import os
import struct
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from mergekit.io.lazy_unpickle import DeferredLoad, LazyTorchUnpickler

from ner_merge.errors import ModelError
from ner_merge.models.reader import DTYPE_NAMES, TensorHeader

# A zip local file header: signature, 22 bytes we do not need, name and extra
# field lengths; the record's data follow the name and the extra field.
LOCAL_HEADER = struct.Struct("<4s22xHH")
LOCAL_SIGNATURE = b"PK\x03\x04"


class Malformed(ValueError):
    """What this module found wrong with a file, said in its own words."""


@dataclass(frozen=True)
class StoredTensor:
    """A tensor as the pickle describes it: a view of a storage record."""

    key: str  # the storage record's name under PREFIX/data/
    dtype: torch.dtype
    offset: int  # in elements, from the start of the storage
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _stored_tensor(
    storage: DeferredLoad,
    offset: int,
    shape: Sequence[int],
    stride: Sequence[int],
    *_: Any,  # requires_grad, hooks, metadata: nothing about the bytes
) -> StoredTensor:
    """Stands in for torch's `_rebuild_tensor_v2` while the pickle is read."""
    return StoredTensor(
        storage.name, storage.dtype, offset, tuple(shape), tuple(stride)
    )


class _LocatingUnpickler(LazyTorchUnpickler):
    """mergekit's lazy unpickler, rebuilding tensors as `StoredTensor`s.

    mergekit gets its `DeferredLoad`s by patching torch and pickle globally for
    the duration of a load; this subclass needs no patching.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _stored_tensor
        return super().find_class(module, name)


def read_torch_headers(file_path: str) -> dict[str, TensorHeader]:
    """Every tensor's header in a torch.save archive, its data unread.

    A truncated download, a corrupt file, a file saved before torch 1.6 or one
    holding anything but a state dict fails here, naming the file, before any
    tensor is scored.
    """
    try:
        return _headers(file_path)
    except Exception as error:  # a damaged zip or pickle raises many kinds
        why = (
            error
            if isinstance(error, Malformed)
            else f"{type(error).__name__}: {error}"
        )
        raise ModelError(
            f"{file_path}: not a readable PyTorch weights file ({why})"
        ) from None


def _headers(file_path: str) -> dict[str, TensorHeader]:
    size = os.path.getsize(file_path)
    if not zipfile.is_zipfile(file_path):
        raise Malformed(
            "no zip directory at its end: truncated, or in the format of torch "
            "before 1.6, which is not supported"
        )
    with zipfile.ZipFile(file_path) as archive, open(file_path, "rb") as file:
        prefix = _prefix(archive)
        byteorder = f"{prefix}/byteorder"  # absent in archives of older torch
        if byteorder in archive.NameToInfo and archive.read(byteorder) != b"little":
            raise Malformed("its tensors are stored big-endian")
        with archive.open(f"{prefix}/data.pkl") as pickled, warnings.catch_warnings():
            # mergekit asks each legacy storage class (torch.BFloat16Storage...)
            # its dtype, which torch answers with a deprecation warning.
            warnings.filterwarnings("ignore", "TypedStorage is deprecated")
            state = _LocatingUnpickler(pickled).load()
        if not isinstance(state, dict):
            raise Malformed("it holds no state dict")
        starts: dict[str, int] = {}
        headers = {}
        for name, tensor in state.items():
            if not isinstance(tensor, StoredTensor):
                raise Malformed(f"entry {name!r} is not a tensor")
            record = archive.getinfo(f"{prefix}/data/{tensor.key}")
            if tensor.key not in starts:
                starts[tensor.key] = _data_start(file, record, size)
            headers[name] = _header(
                name, tensor, file_path, starts[tensor.key], record.file_size
            )
        return headers


def _prefix(archive: zipfile.ZipFile) -> str:
    """The archive's top folder (`archive`, or the file's stem in older torch)."""
    pickles = [
        name
        for name in archive.namelist()
        if name.endswith("/data.pkl") and name.count("/") == 1
    ]
    if len(pickles) != 1:
        raise Malformed("no single PREFIX/data.pkl: not written by torch.save")
    return pickles[0].removesuffix("/data.pkl")


def _data_start(file: BinaryIO, record: zipfile.ZipInfo, size: int) -> int:
    """Where a stored record's data begin in the file, checked to end in it."""
    if record.compress_type != zipfile.ZIP_STORED:
        raise Malformed(f"record {record.filename} is compressed")
    file.seek(record.header_offset)
    signature, name_length, extra_length = LOCAL_HEADER.unpack(
        file.read(LOCAL_HEADER.size)
    )
    if signature != LOCAL_SIGNATURE:
        raise Malformed(f"record {record.filename} has no local header")
    start = record.header_offset + LOCAL_HEADER.size + name_length + extra_length
    if start + record.file_size > size:
        raise Malformed(
            f"truncated: record {record.filename} ends at byte "
            f"{start + record.file_size} of {size}"
        )
    return start


def _header(
    name: str, tensor: StoredTensor, file_path: str, data_start: int, data_size: int
) -> TensorHeader:
    """The tensor's byte range in the file; its strides only if not contiguous."""
    dtype = DTYPE_NAMES.get(tensor.dtype)
    if dtype is None:
        raise Malformed(f"tensor {name}: dtype {tensor.dtype} is not supported")
    count = math.prod(tensor.shape)
    # Elements from the view's first to its last (strides are never negative).
    span = count and 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
    start = tensor.offset * tensor.dtype.itemsize
    end = start + span * tensor.dtype.itemsize
    if end > data_size:
        raise Malformed(f"tensor {name} runs past the end of its storage")
    contiguous = count == 0 or all(
        stride == expected
        for n, stride, expected in zip(
            tensor.shape, tensor.stride, _row_major(tensor.shape)
        )
        if n > 1  # the stride of a dimension of size 1 is never used
    )
    return TensorHeader(
        dtype=dtype,
        shape=tensor.shape,
        path=file_path,
        start=data_start + start,
        end=data_start + end,
        stride=None if contiguous else tensor.stride,
    )


def _row_major(shape: tuple[int, ...]) -> list[int]:
    """The strides of a contiguous tensor of this shape."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return strides[::-1]
