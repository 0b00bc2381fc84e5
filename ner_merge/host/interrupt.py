"""Ctrl-C: one line that says what the interrupted run left, and the exit code
that goes with it.

A run that writes an output (a merge's OUT, `compare`'s DIR) is interrupted
either before that output is published or after. Before, the staging folder
and the lock go as the interrupt unwinds (`ner_merge.host.output`): nothing is left,
OUT is as it was, and the exit code is 130, the shell's code for Ctrl-C. After,
the output is complete and in place, so the run is reported as done and exits
0, even when the interrupt comes as the process ends. A run that writes nothing
(`eval`, `show`) just says it was interrupted.

A published output is told apart from a staged one by identity: publishing
renames the staging folder to OUT, which keeps its inode.
"""

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command ended by Ctrl-C
# The programs whose Ctrl-C this module handles; a Python session that merges
# through mergekit's API keeps its own.
COMMANDS = ("mergekit-yaml", "ner-merge")


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C during a run that publishes `target`, and whether it had been."""

    def __init__(self, target: str, published: bool) -> None:
        super().__init__(target, published)
        self.target, self.published = target, published


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


@contextmanager
def publishing(target: str | Path) -> Iterator[Callable[[Path], None]]:
    """Within the block, a Ctrl-C becomes an `Interrupted` that knows whether
    `target` was published: call the function yielded with the staging folder
    once it exists; `target` being that very folder means it was."""
    staged: list[tuple[int, int] | None] = []

    def note(staging: Path) -> None:
        staged.append(_identity(staging))

    try:
        yield note
    except Interrupted:
        raise
    except KeyboardInterrupt:
        published = bool(staged) and _identity(Path(target)) == staged[-1]
        raise Interrupted(str(target), published) from None


def say(line: str) -> None:
    """One line on stderr, on a line of its own (a progress bar may be open)."""
    print(f"\n{line}", file=sys.stderr, flush=True)


def interrupted(program: str, interrupt: KeyboardInterrupt) -> int:
    """Say what an interrupt left; the exit code: 0 if its output was published,
    else 130. Later interrupts end the process at once with that code: the line
    is said, and the threads still finishing a tensor have nothing to add."""
    if isinstance(interrupt, Interrupted) and interrupt.published:
        say(f"{program}: interrupted after {interrupt.target} was written: complete")
        code = 0
    elif isinstance(interrupt, Interrupted):
        say(
            f"{program}: interrupted; nothing was written "
            f"({interrupt.target} is as it was)"
        )
        code = INTERRUPTED
    else:
        say(f"{program}: interrupted; nothing was written")
        code = INTERRUPTED
    end_on_interrupt(code)
    return code


def end_on_interrupt(code: int, line: str | None = None) -> None:
    """From now on, Ctrl-C ends the process at once with `code`, saying `line`:
    for a run whose outcome is settled (its output published, or its
    interruption reported), whatever is left to do is cleanup. Only in our
    command-line programs, in the main thread."""
    if not from_command_line():
        return

    def end(*_) -> NoReturn:
        if line:
            say(line)
        sys.stdout.flush()
        os._exit(code)

    signal.signal(signal.SIGINT, end)


def from_command_line() -> bool:
    """Whether this process is one of COMMANDS, which own their Ctrl-C."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    return os.path.splitext(program)[0] in COMMANDS  # on Windows: ner-merge.exe
