"""The score cache: every NER ever computed, on disk, keyed by what determines it.

A score depends on exactly these: the tensor's bytes (with dtype and shape: its
content hash, see `ner_merge.models.content`), the scoring options, the precision it was
computed in, the kind of device (float32 rounds differently on a GPU) and the
kernel (KERNEL_VERSION). Each score is one small JSON file named by a hash of
exactly those, so re-planning models already scored, in any recipe or order,
reads nothing but headers, the content index and these files; a tensor whose
bytes changed has another hash and so misses, and a tensor two models share (a
fine-tune that left it alone) is scored once.

Fast (float32) scores, with their bounds, and exact scores are kept apart: a
near tie's refinement adds the exact score beside the fast one, which stays, so
that a later plan makes the very map a first one did (the same fast scores, the
same refinements); a fast score that is exact (bound 0) is stored as both.

Writes go to a temporary file in the same folder and are renamed into place
(`ner_merge.models.cache_folder`): concurrent runs at worst compute a score twice, and a
run killed at any moment leaves either no entry or a whole one. An unreadable or
malformed entry counts as a miss (said once per run) and is overwritten.
"""

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from ner_merge.models.cache_folder import write_json_atomically
from ner_merge.scoring.ner import KERNEL_VERSION, BoundedScore

LOG = logging.getLogger(__name__)


class ScoreCache:
    """NER scores on disk for one set of scoring options, in both precisions.

    precision: "fast" (float32 scores with bounds) or "exact".
    """

    def __init__(self, root: Path, options: dict[str, Any]) -> None:
        self.root = Path(root) / f"kernel-{KERNEL_VERSION}"
        self.options = options
        self._warned = False

    def _key(self, precision: str) -> str:
        return json.dumps(self.options | {"precision": precision}, sort_keys=True)

    def _path(self, tensor_hash: str, precision: str) -> Path:
        text = f"{tensor_hash}\0{self._key(precision)}"
        key = hashlib.sha256(text.encode()).hexdigest()
        return self.root / key[:2] / f"{key}.json"

    def get(self, tensor_hash: str, precision: str) -> BoundedScore | None:
        """The stored score of the tensor with this content hash, or None."""
        path = self._path(tensor_hash, precision)
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            self._warn(f"score cache entry {path} unreadable ({error})")
            return None
        if not isinstance(entry, dict):
            entry = {}
        score, bound = entry.get("ner"), entry.get("bound", 0.0)
        if not (_is_number(score) and _is_number(bound) and bound >= 0):
            self._warn(f"score cache entry {path} malformed")
            return None
        if precision == "exact" and bound != 0.0:
            self._warn(f"score cache entry {path} malformed")
            return None
        if entry.get("tensor") != tensor_hash or entry.get("options") != self._key(
            precision
        ):
            return None  # a hash collision or a foreign file: never trust it
        return BoundedScore(score, bound)

    def put(self, tensor_hash: str, precision: str, score: BoundedScore) -> None:
        """Store a score atomically; a fast score that is exact is also stored as
        the exact one. A cache that cannot be written only costs a later
        re-computation, so that is a warning (once), not an error."""
        precisions = [precision] + (["exact"] if score.exact else [])
        for kind in dict.fromkeys(precisions):
            entry = {
                "tensor": tensor_hash,
                "options": self._key(kind),
                "ner": score.value,
            }
            if kind == "fast":
                entry["bound"] = score.bound
            try:
                write_json_atomically(self._path(tensor_hash, kind), entry)
            except OSError as error:
                self._warn(f"score cache {self.root} not written ({error})")

    def _warn(self, message: str) -> None:
        if not self._warned:
            LOG.warning("%s; scores missing from it are computed again", message)
            self._warned = True


def _is_number(value: object) -> bool:
    """A float that is a score or bound (JSON may hold anything: NaN is none)."""
    return isinstance(value, float) and math.isfinite(value)
