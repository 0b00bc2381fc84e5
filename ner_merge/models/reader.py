"""Read one tensor from a weights file with plain reads, not a memory map.

Pages of a memory-mapped shard stay mapped (and count in the process's resident
memory) until the file is closed, so scoring every tensor through a map grows
memory to the size of the model. Reading each tensor's bytes into a buffer of
its own keeps memory at the size of the tensor being scored.

Both formats mergekit reads store a tensor's bytes as one range of its file: a
safetensors shard by its header, a `pytorch_model.bin` (a zip archive whose
records are stored uncompressed) inside the record of its storage, found by
`ner_merge.models.torch_archive`. So one description, `TensorHeader`, serves both.
"""

import math
from dataclasses import dataclass

import torch

# safetensors dtype names -> torch dtypes (those a model's weights use).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# torch dtypes -> their safetensors names, the names used everywhere here.
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorHeader:
    """Where one tensor lies in its file and what it is, known without its data."""

    dtype: str  # a safetensors name (DTYPES)
    shape: tuple[int, ...]
    path: str = ""  # the shard file, and where in it the data lie
    start: int = 0
    end: int = 0
    # Only for a tensor a .bin stores as a non-contiguous view: its element
    # strides; [start, end) then spans the view, which is made contiguous on reading.
    stride: tuple[int, ...] | None = None


def read_bytes(header: TensorHeader) -> bytearray:
    """The tensor's raw bytes, contiguous, in a fresh buffer."""
    buffer = bytearray(header.end - header.start)
    with open(header.path, "rb") as file:
        file.seek(header.start)
        if file.readinto(buffer) != len(buffer):
            raise OSError(f"{header.path}: file ends inside a tensor")
    if header.stride is None:
        return buffer
    return _contiguous(header, buffer)


def _contiguous(header: TensorHeader, span: bytearray) -> bytearray:
    """The bytes of the strided view stored in `span`, in row-major order: what
    safetensors would store, so both formats hash a tensor alike."""
    dtype = DTYPES[header.dtype]
    dense = bytearray(math.prod(header.shape) * dtype.itemsize)
    view = torch.frombuffer(span, dtype=dtype).as_strided(header.shape, header.stride)
    torch.frombuffer(dense, dtype=dtype).view(header.shape).copy_(view)
    return dense


def as_tensor(header: TensorHeader, buffer: bytearray) -> torch.Tensor:
    """The tensor stored in `buffer` (no copy: the tensor owns the buffer)."""
    dtype = DTYPES[header.dtype]
    if not buffer:
        return torch.empty(header.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(header.shape)
