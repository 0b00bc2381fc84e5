"""The cache folder, and writing JSON into it so a reader sees all or nothing.

Two caches live in this one folder: the content index (`ner_merge.models.content`),
which spares re-hashing unchanged model files, and the score cache
(`ner_merge.scoring.cache`), keyed by the kernel's version. Both need only where the
folder is, whether it can be used, and an atomic write; those live here, below
both, so finding and reading models does not depend on scoring.
"""

import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path

LOG = logging.getLogger(__name__)

# Overrides the cache folder; "off" disables the cache.
CACHE_DIR_VARIABLE = "NER_MERGE_CACHE_DIR"
CACHE_DISABLED = "off"


def default_cache_dir() -> Path | None:
    """$NER_MERGE_CACHE_DIR, else $XDG_CACHE_HOME/ner-merge, else ~/.cache/ner-merge;
    None when set to "off" or when that folder cannot be used."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured == CACHE_DISABLED:
        return None
    if configured:
        folder = Path(configured)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(base) / "ner-merge"
    return folder if _usable(folder) else None


@functools.cache
def _usable(folder: Path) -> bool:
    """Whether the folder takes new files: tried with a temporary file where it
    exists (permission bits lie to root and on read-only mounts); where it does
    not, whether its nearest existing parent lets it be made.

    Nothing is created here: the folder is made by the first entry written into
    it, so a run refused before scoring leaves no trace. Both the score cache
    and the content index live here: one unusable folder is said once per run,
    here, rather than once by each of them, and neither tries it again.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if existing == folder:
            with tempfile.TemporaryFile(dir=folder):
                pass
        elif not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            raise PermissionError(
                errno.EACCES, f"cannot create folders in {existing}", str(existing)
            )
    except OSError as error:
        LOG.warning(
            "cache folder %s cannot be used (%s): no scores or content hashes are "
            "kept this run; point %s at a writable folder, or set it to %s",
            folder,
            error.strerror or error,
            CACHE_DIR_VARIABLE,
            CACHE_DISABLED,
        )
        return False
    return True


def write_json_atomically(path: Path, document: object) -> None:
    """A JSON file written as `write_text_atomically` writes."""
    write_text_atomically(path, json.dumps(document, sort_keys=True))


def write_text_atomically(path: Path, text: str) -> None:
    """Write a text file by renaming a finished temporary file into place, so
    readers (a concurrent run, or the next one after a kill) see either no file
    or a whole one, and a failed write (a full disk) leaves an earlier file as
    it was. The file gets the mode a plain write gives (the umask's). Raises
    OSError, leaving no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
