"""Exact content identity: a hash of every tensor, and a model's fingerprint.

A score is a pure function of a tensor's bytes (with its dtype and shape) and the
scoring mode, so the score cache is keyed on a BLAKE3 hash of exactly those; a
model's fingerprint is a hash over its tensors' names and hashes. A changed byte
anywhere changes both, so no score or source map is ever reused for other bytes.

Hashing needs the bytes: a tensor is hashed as it is read for scoring, and the
tensors no rule scores are read (once) to complete the fingerprint. While
its bytes are at hand, each floating-point tensor is also checked for NaN and Inf
(one `aminmax` pass, through which NaN propagates; about 30 GB/s here), so no
non-finite value can reach the output unnoticed.

Reading whole models on every plan would make a second plan as slow as the first,
so an index in the cache folder keeps each shard file's digests under a key that
changes whenever the file may have: for a local file, its real path, size,
inode, mtime and ctime (which no tool can set back); for a file of a Hugging Face
snapshot, the name of the blob it links to, which is the hash of its content.
"""

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import blake3
import torch

from ner_merge.errors import ModelError
from ner_merge.models.cache_folder import write_json_atomically
from ner_merge.models.reader import TensorHeader, as_tensor, read_bytes

LOG = logging.getLogger(__name__)

INDEX_VERSION = 1  # bump when a digest's definition changes
HUB_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # git sha1 or sha256


@dataclass(frozen=True)
class TensorDigest:
    """What identifies one stored tensor, and whether all its values are finite."""

    hash: str  # BLAKE3 of dtype, shape and bytes
    finite: bool  # False: it holds NaN or Inf (integer tensors are always finite)


def digest(header: TensorHeader, data: bytearray) -> TensorDigest:
    """The digest of one tensor's bytes, as read from its shard: contiguous and
    little-endian in either format (`ner_merge.models.reader`), so a pytorch_model.bin
    and its safetensors conversion give their tensors the same hashes."""
    hasher = blake3.blake3(f"{header.dtype}\0{list(header.shape)}\0".encode())
    hasher.update(data)
    return TensorDigest(hasher.hexdigest(), _all_finite(as_tensor(header, data)))


def _all_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: aminmax has no kernel for it
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def file_key(path: str) -> str:
    """What must be unchanged for a shard's indexed digests to still hold."""
    real = os.path.realpath(path)
    status = os.stat(real)
    if Path(real).parent.name == "blobs" and HUB_BLOB_NAME.fullmatch(Path(real).name):
        return json.dumps(["hub-blob", Path(real).name, status.st_size])
    return json.dumps(
        [
            "file",
            real,
            status.st_size,
            status.st_ino,
            status.st_mtime_ns,
            status.st_ctime_ns,
        ]
    )


class DigestIndex:
    """Digests of shard files on disk, one small JSON file per shard file.

    Entries are written to a temporary file and renamed into place, so a killed
    or concurrent run leaves either no entry or a whole one. An entry that cannot
    be read or does not match is a miss; a folder that cannot be written costs
    only re-reading next time, and is said once.
    """

    _warned: set[Path] = set()  # folders already warned about, in this process

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / f"content-{INDEX_VERSION}"

    def _path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def load(self, key: str) -> dict[str, TensorDigest]:
        try:
            entry = json.loads(self._path(key).read_text())
            if entry["key"] != key:
                return {}
            return {
                name: TensorDigest(str(value["hash"]), bool(value["finite"]))
                for name, value in entry["tensors"].items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            self._warn(f"content index entry {self._path(key)} ignored: {error}")
            return {}

    def save(self, key: str, digests: dict[str, TensorDigest]) -> None:
        tensors = {n: {"hash": d.hash, "finite": d.finite} for n, d in digests.items()}
        try:
            write_json_atomically(self._path(key), {"key": key, "tensors": tensors})
        except OSError as error:
            self._warn(f"content index not written to {self.root}: {error}")

    def _warn(self, message: str) -> None:
        if self.root not in self._warned:
            LOG.warning("%s (models will be read again next time)", message)
            self._warned.add(self.root)


class ModelContent:
    """Every tensor digest of one model: indexed where its files are unchanged,
    computed as tensors are read otherwise."""

    def __init__(
        self, name: str, headers: dict[str, TensorHeader], index: DigestIndex | None
    ) -> None:
        self.name = name
        self.headers = headers
        self.index = index
        self._names: dict[str, set[str]] = {}  # shard file -> its tensors
        for name, header in headers.items():
            self._names.setdefault(header.path, set()).add(name)
        self._keys = {path: file_key(path) for path in sorted(self._names)}
        self._digests: dict[str, TensorDigest] = {}
        if index is not None:
            for path, key in self._keys.items():
                known = index.load(key)
                if set(known) == self._names[path]:
                    self._digests.update(known)
        self._indexed = set(self._digests)

    def known(self, name: str) -> TensorDigest | None:
        """The tensor's digest if it is already known (indexed or read)."""
        return self._digests.get(name)

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor, in a buffer of its own; its digest is recorded."""
        header = self.headers[name]
        data = read_bytes(header)
        self._digests[name] = digest(header, data)
        return as_tensor(header, data)

    def record(self, name: str, found: TensorDigest) -> None:
        """Keep a digest a worker computed; one that differs from the digest
        already known means other bytes were read (a file rewritten meanwhile,
        or another file at that path on a cluster's worker)."""
        known = self._digests.setdefault(name, found)
        if known != found:
            raise ModelError(
                f"model {self.name}: tensor {name} was read with other bytes than "
                f"before ({self.headers[name].path} changed, or a worker sees "
                "another file at that path)"
            )

    def digest(self, name: str) -> TensorDigest:
        """The tensor's digest, read (and kept) if not yet known."""
        if name not in self._digests:
            self.read(name)
        return self._digests[name]

    def finite(self, name: str) -> bool:
        """Whether the tensor holds only finite values (read if not yet known)."""
        return self.digest(name).finite

    def complete(self) -> None:
        """Read every tensor whose digest is unknown, then index the new ones."""
        for name in self.headers:
            self.digest(name)
        if self.index is None:
            return
        for path, key in self._keys.items():
            names = self._names[path]
            if not names <= self._indexed:
                self.index.save(key, {n: self._digests[n] for n in sorted(names)})
        self._indexed = set(self._digests)

    @property
    def fingerprint(self) -> str:
        """BLAKE3 over every tensor's name and hash, in name order."""
        self.complete()
        hasher = blake3.blake3()
        for name in sorted(self._digests):
            hasher.update(f"{name}\0{self._digests[name].hash}\n".encode())
        return hasher.hexdigest()
