"""The output folder: checked before any work, locked for the run, written beside
itself, and published by renames that a later run can finish.

What is never done to OUT (the list in docs/outputs.md):
- an existing OUT is replaced only when it is a previous merge's output: it holds
  the manifest a merge writes last, and nothing the manifest does not list;
- OUT may not be, hold or lie inside an input model, nor be the current folder or
  one that holds it;
- a symbolic link is followed: its target is replaced and the link is kept;
- two merges never write one OUT at once: a lock file beside OUT is held for the
  whole run (a `filelock` lock: flock on Linux and macOS, a locked file on
  Windows), and a second run stops at once, saying so; it is taken only once OUT
  is accepted, so a refused run writes nothing;
- the merge must fit: its size is checked against OUT's free disk space before
  any work (`ner_merge.host.space`), and a disk that fills up anyway (another writer,
  a quota) ends the run in one line, the staged copy removed, nothing published;
- every file published gets the permissions the user's umask gives a new file
  (safetensors writes its files 0600, through a temporary file, which would make
  a shared model folder unreadable to the group);
- a staged merge is complete once its manifest is written. Publishing moves the
  old OUT aside, renames the staged folder to OUT, then deletes the old one. A run
  killed between the two renames leaves both beside OUT, and the next run
  finishes that publish (or, if the staged merge is incomplete, restores the old
  OUT) before it starts; it deletes nothing else.
"""

import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from ner_merge.errors import DiskFullError, OutputError
from ner_merge.host.space import check_room, is_disk_full

LOG = logging.getLogger(__name__)

MANIFEST_FILE = ".ner-merge-manifest.json"  # written last: the merge is complete
STAGING_SUFFIX = ".ner-partial"
LOCK_SUFFIX = ".ner-lock"
PREVIOUS = "previous"  # inside the staging root: OUT moved aside while publishing
MAX_NAMED = 5  # files named in a refusal
MODE_PROBE = ".ner-merge-mode-probe"  # created and removed at once, in staging


def _listed(paths: list[str]) -> str:
    shown = ", ".join(paths[:MAX_NAMED])
    return shown + (
        f" and {len(paths) - MAX_NAMED} more" if len(paths) > MAX_NAMED else ""
    )


def _files_of(folder: Path) -> list[str]:
    """Every file and folder under `folder`, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _manifest(folder: Path) -> set[str] | None:
    """The files a merge wrote into `folder`, if a merge wrote it."""
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) if isinstance(files, list) else None


def _creation_mode(folder: Path) -> int:
    """The permission bits a new file gets in `folder`: 0o666 less the umask (or
    as a default ACL says). Found by creating a file, since os.umask reads the
    umask only by setting it, for every thread of the process at once."""
    probe = folder / MODE_PROBE
    handle = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(handle).st_mode)
    finally:
        os.close(handle)
        os.unlink(probe)


def give_creation_mode(folder: Path) -> None:
    """Every file under `folder` as a plain write under the user's umask makes it
    (writers that create files 0600 first, or copies keeping a source's bits)."""
    mode = _creation_mode(folder)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


class OutputFolder:
    """OUT for one merge: `prepare()` before any work, `staged()` to write it."""

    def __init__(self, out_path: str, inputs: list[str], role: str = "OUT") -> None:
        """role: how refusals name the folder (`OUT`, or the option that gave it)."""
        self.role = role
        self.named = f"{role} {out_path}"
        self.target = Path(out_path).resolve()  # follows a symlinked OUT
        self.inputs = [Path(path).resolve() for path in inputs]
        self.root = self.target.parent / f".{self.target.name}{STAGING_SUFFIX}"
        self.lock_path = self.target.parent / f".{self.target.name}{LOCK_SUFFIX}"

    @contextmanager
    def prepared(self, needed: int | None = None) -> Iterator["OutputFolder"]:
        """Refuse an OUT that must not be replaced, lock it for the whole block,
        finish an interrupted publish, and refuse a merge of `needed` bytes its
        disk has no room for (counted once a killed run's leftovers are gone).
        All of it before any scoring; a refusal before the lock writes nothing."""
        self._refuse_where_it_lies()
        self._refuse_what_it_holds()
        with self._locked():
            self._recover()
            self._refuse_what_it_holds()  # as it is now, under the lock
            if needed is not None:
                check_room(self.root, needed, self.named)
            yield self

    def _refuse_where_it_lies(self) -> None:
        here = Path.cwd().resolve()
        if self.target == here or self.target in here.parents:
            raise OutputError(
                f"{self.named}: is the current folder or holds it; a merge "
                "replaces OUT whole, so name a new folder"
            )
        for model in self.inputs:
            if self.target == model:
                raise OutputError(f"{self.named}: is input model {model}")
            if model in self.target.parents:
                raise OutputError(f"{self.named}: lies in input model {model}")
            if self.target in model.parents:
                raise OutputError(f"{self.named}: holds input model {model}")

    def _refuse_what_it_holds(self) -> None:
        if not self.target.exists():
            return
        if not self.target.is_dir():
            raise OutputError(f"{self.named}: is a file, not a folder")
        present = sorted(os.listdir(self.target))  # not a walk: OUT may be huge
        if not present:
            return
        written = _manifest(self.target)
        if written is None:
            raise OutputError(
                f"{self.named}: exists and is not a merge's output (it holds "
                f"{_listed(present)}); choose another folder or empty it yourself"
            )
        foreign = [name for name in _files_of(self.target) if name not in written]
        if foreign:
            raise OutputError(
                f"{self.named}: a merge's output with files added since "
                f"({_listed(foreign)}); move them out or choose another folder"
            )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock = FileLock(self.lock_path)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire(timeout=0)
        except Timeout:
            raise OutputError(
                f"{self.named}: another merge is writing it (it holds "
                f"{self.lock_path}); wait for it to end"
            ) from None
        except OSError as error:
            raise OutputError(
                f"{self.named}: cannot write beside it ({error.strerror}: "
                f"{error.filename})"
            ) from None
        try:
            yield
        finally:
            # Removed while still held, so that no run leaves it behind: a run
            # that opened it meanwhile finds it unlinked once it gets the lock
            # (filelock checks) and is refused. Windows cannot remove an open
            # file; filelock removes it there, as it releases it.
            with suppress(OSError):
                os.unlink(self.lock_path)
            lock.release()

    def _recover(self) -> None:
        """Finish or undo what a killed run left in the staging root."""
        if not self.root.exists():
            return
        staged, previous = self.root / self.target.name, self.root / PREVIOUS
        foreign = sorted(set(os.listdir(self.root)) - {staged.name, PREVIOUS})
        if foreign:
            raise OutputError(
                f"{self.named}: {self.root} holds files no merge wrote "
                f"({_listed(foreign)}); move them out"
            )
        if not self.target.exists():
            if staged.exists() and _manifest(staged) is not None:
                staged.rename(self.target)
                LOG.warning(
                    "finished publishing %s, cut short by an earlier run", self.target
                )
            elif previous.exists():
                previous.rename(self.target)
                LOG.warning(
                    "restored %s, which an earlier run had moved aside", self.target
                )
        shutil.rmtree(self.root)  # an unfinished merge, or the output now replaced

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A folder to write the merge into; published as OUT if the block ends
        normally, removed if it (or completing it) raises. Its name is OUT's,
        which the model card quotes. A disk that filled up is said in one line."""
        staging = self.root / self.target.name
        try:
            staging.mkdir(parents=True)
            yield staging
            self._complete(staging)
        except BaseException as error:
            shutil.rmtree(self.root, ignore_errors=True)
            if isinstance(error, DiskFullError) or is_disk_full(error):
                raise DiskFullError(self._disk_full()) from None
            raise
        self._publish(staging)

    def _disk_full(self) -> str:
        what = "OUT" if self.role == "OUT" else "folder"  # not "the earlier -o"
        kept = (
            f"the earlier {what} is unchanged"
            if self.target.exists()
            else f"no {what} was created"
        )
        return (
            f"{self.named}: its disk filled up while the merge was written; "
            f"nothing was published and {kept}. Free some space there (the "
            "merge's size was checked before it started: another writer or a "
            "quota took it) and run again"
        )

    def _complete(self, staging: Path) -> None:
        """The staged merge's last writes: the umask's modes, then the manifest."""
        give_creation_mode(staging)
        files = _files_of(staging) + [MANIFEST_FILE]
        manifest = json.dumps({"files": files}, indent=1) + "\n"
        (staging / MANIFEST_FILE).write_text(manifest, encoding="utf-8")

    def _publish(self, staging: Path) -> None:
        if self.target.exists():
            self.target.rename(self.root / PREVIOUS)
        staging.rename(self.target)
        shutil.rmtree(self.root)
        LOG.info("NER merge written to %s", self.target)
