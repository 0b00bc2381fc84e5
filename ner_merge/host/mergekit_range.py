"""The mergekit releases ner-merge works with, and one line for any other.

`merge_method: ner` reaches into mergekit's internals (its run_merge, its
planner, its method registry), which a minor release may change: 0.1.x is
what was tested, and 0.2 may break it. Outside the range the method is not
offered at all (the hook stands down, `ner-merge plan` and `compare` refuse),
while every other mergekit method keeps working.

The version is read from the installed distribution's metadata, so the check
imports neither mergekit nor torch.
"""

from importlib import metadata

from ner_merge.errors import NerMergeError

# Keep in step with `dependencies` in pyproject.toml (a test compares them).
MERGEKIT_RANGE = ">=0.1.5,<0.2"


def installed_mergekit() -> str | None:
    """The installed mergekit's version; None when it is not installed."""
    try:
        return metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        return None


def mergekit_problem() -> str | None:
    """Why `merge_method: ner` cannot run with the installed mergekit, in one
    line (found version, needed range, what to install); None when it can."""
    return problem_with(installed_mergekit())


def problem_with(found: str | None) -> str | None:
    """`mergekit_problem` for mergekit `found` (None: not installed)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        if found is not None and Version(found) in SpecifierSet(MERGEKIT_RANGE):
            return None
    except InvalidVersion:
        pass
    return (
        f"mergekit {found or '(not installed)'} is installed, but ner-merge needs "
        f"mergekit{MERGEKIT_RANGE}: merge_method 'ner' is unavailable; install a "
        f"matching one: pip install 'mergekit{MERGEKIT_RANGE}'"
    )


def check_mergekit() -> None:
    """Refuse to plan or merge with a mergekit outside the range."""
    problem = mergekit_problem()
    if problem is not None:
        raise NerMergeError(problem)
