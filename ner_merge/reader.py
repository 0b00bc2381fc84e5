"""Read one tensor from a safetensors shard with plain reads, not a memory map.

Pages of a memory-mapped shard stay mapped (and count in the process's resident
memory) until the file is closed, so scoring every tensor through a map grows
memory to the size of the model. Reading each tensor's bytes into a buffer of
its own keeps memory at the size of the tensor being scored.
"""

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


@dataclass(frozen=True)
class TensorHeader:
    """What a safetensors header says of one tensor, read without its data."""

    dtype: str
    shape: tuple[int, ...]
    path: str = ""  # the shard file, and where in it the data lie
    start: int = 0
    end: int = 0


def read_bytes(header: TensorHeader) -> bytearray:
    """The tensor's raw bytes, in a fresh buffer."""
    buffer = bytearray(header.end - header.start)
    with open(header.path, "rb") as file:
        file.seek(header.start)
        if file.readinto(buffer) != len(buffer):
            raise OSError(f"{header.path}: file ends inside a tensor")
    return buffer


def as_tensor(header: TensorHeader, buffer: bytearray) -> torch.Tensor:
    """The tensor stored in `buffer` (no copy: the tensor owns the buffer)."""
    dtype = DTYPES[header.dtype]
    if not buffer:
        return torch.empty(header.shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(header.shape)
