"""The score cache: every NER ever computed, on disk, keyed by what determines it.

A score depends on the tensor's content (model fingerprint and tensor name), the
scoring options and the kernel (KERNEL_VERSION). Each score is one small JSON
file named by a hash of exactly those, under a folder per model fingerprint, so
re-planning models already scored, in any recipe or order, reads nothing but
headers and these files; a changed model has a new fingerprint and so misses.

Writes go to a temporary file in the same folder and are renamed into place
(`os.replace` is atomic): concurrent runs at worst compute a score twice, and a
run killed at any moment leaves either no entry or a whole one. An unreadable
entry counts as a miss and is overwritten.
"""

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ner_merge.ner import KERNEL_VERSION

LOG = logging.getLogger(__name__)

# Overrides the cache folder; "off" disables the cache.
CACHE_DIR_VARIABLE = "NER_MERGE_CACHE_DIR"
CACHE_DISABLED = "off"


def default_cache_dir() -> Path | None:
    """$NER_MERGE_CACHE_DIR, else $XDG_CACHE_HOME/ner-merge, else ~/.cache/ner-merge."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured == CACHE_DISABLED:
        return None
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ner-merge"


class ScoreCache:
    """NER scores on disk for one set of scoring options."""

    def __init__(self, root: Path, options: dict[str, Any]) -> None:
        self.root = Path(root) / f"kernel-{KERNEL_VERSION}"
        self.options = json.dumps(options, sort_keys=True)

    def _path(self, fingerprint: str, tensor: str) -> Path:
        key = hashlib.sha256(f"{tensor}\0{self.options}".encode()).hexdigest()
        return self.root / fingerprint / f"{key}.json"

    def get(self, fingerprint: str, tensor: str) -> float | None:
        """The stored score, or None when absent or unreadable."""
        try:
            entry = json.loads(self._path(fingerprint, tensor).read_text())
        except (OSError, ValueError):
            return None
        if entry.get("tensor") != tensor or entry.get("options") != self.options:
            return None  # a hash collision or a foreign file: never trust it
        score = entry.get("ner")
        return float(score) if isinstance(score, (int, float)) else None

    def put(self, fingerprint: str, tensor: str, score: float) -> None:
        """Store a score atomically. A cache that cannot be written only costs a
        later re-computation, so that is a warning, not an error."""
        path = self._path(fingerprint, tensor)
        entry = {"tensor": tensor, "options": self.options, "ner": score}
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(handle, "w") as file:
                json.dump(entry, file)
            os.replace(temporary, path)
        except OSError as error:
            LOG.warning("score cache %s not written: %s", path, error)
            if temporary is not None and os.path.exists(temporary):
                os.unlink(temporary)
