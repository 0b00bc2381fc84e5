"""Let the stock `mergekit-yaml` (and every mergekit CLI) run `merge_method: ner`.

mergekit 0.1.5 has no plugin mechanism, so the installed `ner_merge_hook.pth`
imports this module at interpreter start. It must stay cheap (no torch, no
mergekit: `python -X importtime -c pass` shows neither) and so only installs an
import finder. When mergekit itself is imported later, the finder acts right after
two of its modules execute:
- `mergekit.merge_methods`: register the `ner` method;
- `mergekit.merge`: wrap `run_merge`, which every mergekit CLI calls, so an NER
  recipe is planned first and its output is written atomically with a report;
- `mergekit.plan`: work around a mergekit bug that NER merges of BERT hit (see
  `ner_merge.host.mergekit_fixes`).
The CLIs bind `run_merge` by name when they import it, which is why the wrap has
to happen as the module executes, not later.

(importlib.abc is avoided on purpose: importing it costs 40 ms at every start.)

Attaching is all or nothing. A failure here must not break mergekit for other
recipes, nor let an NER recipe merge without its plan, map, report and the
output folder's safety: if any part cannot attach (or the installed mergekit is
outside the supported range, see `ner_merge.host.mergekit_range`), it is reported
in one line on stderr, `ner` is taken out of mergekit's registry again (or
never put in), and mergekit carries on with its own methods, refusing an NER
recipe. Set NER_MERGE_DISABLE_HOOK=1 to switch the hook off.

One more thing must happen this early, before torch starts its OpenMP threads:
for `mergekit-yaml` with an NER recipe, the passive OpenMP wait policy (see
`ner_merge.scoring.threads`); no other program's environment is touched.
"""

import importlib.machinery
import os
import sys
from types import ModuleType

DISABLE_VARIABLE = "NER_MERGE_DISABLE_HOOK"
# ner_merge.recipe.recipe.METHOD_NAME, not imported: that module needs mergekit.
METHOD_NAME = "ner"


def _register_method(module: ModuleType) -> None:
    from ner_merge.host.method import register

    register()


def _wrap_run_merge(module: ModuleType) -> None:
    from ner_merge.host.pipeline import with_ner_planning

    module.run_merge = with_ner_planning(module.run_merge)


def _fix_planner(module: ModuleType) -> None:
    from ner_merge.host.mergekit_fixes import fix_optional_aliases

    fix_optional_aliases(module)


AFTER_IMPORT = {
    "mergekit.merge_methods": _register_method,
    "mergekit.merge": _wrap_run_merge,
    "mergekit.plan": _fix_planner,
}


# Why the hook stood down in this process (None while it may attach): once
# set, no later module gets its action, so nothing is left half attached.
_stood_down: str | None = None


def _attach(module: ModuleType, action) -> None:
    """Run one action on a freshly executed module, unless the hook stood down;
    on any failure, stand down: never raise."""
    global _stood_down
    if _stood_down is not None:
        return
    try:
        from ner_merge.host.mergekit_range import mergekit_problem

        reason = mergekit_problem()
        if reason is None:
            action(module)
            return
    except Exception as error:  # noqa: BLE001 - mergekit must keep working
        reason = (
            f"could not attach to {module.__name__} "
            f"({type(error).__name__}: {error}); merge_method '{METHOD_NAME}' is "
            f"unavailable. Reinstall ner-merge, or set {DISABLE_VARIABLE}=1 to "
            "silence this."
        )
    _stood_down = reason
    _unregister()
    print(f"ner-merge: {reason}", file=sys.stderr)


def _unregister() -> None:
    """Take `ner` out of mergekit's registry if an earlier action put it there.

    mergekit 0.1.5 has no call for this; its registry is a dict by name. Done
    without importing our method module, which may be what failed to import.
    """
    registry = sys.modules.get("mergekit.merge_methods.registry")
    methods = getattr(registry, "_METHODS", None)
    if isinstance(methods, dict):
        methods.pop(METHOD_NAME, None)


class _LoaderThenHook:
    """Run the real loader, then our action, reporting (not raising) its failure."""

    def __init__(self, loader, action):
        self.loader, self.action = loader, action

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _attach(module, self.action)


class _AfterImportFinder:
    """Finds nothing itself: wraps the real spec of the few modules it watches."""

    def find_spec(self, fullname, path, target=None):
        action = AFTER_IMPORT.get(fullname)
        if action is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenHook(spec.loader, action)
        return spec


def _program(argv: list[str]) -> str:
    """The command this process runs, without Windows' `.exe` (`mergekit-yaml`).
    Also in `ner_merge.host.interrupt`, which the hook does not import: at every
    interpreter start, this module must import nothing it can do without."""
    return os.path.splitext(os.path.basename(argv[0]))[0] if argv else ""


def _is_ner_merge(argv: list[str]) -> bool:
    """Whether this process is `mergekit-yaml` given a recipe with
    `merge_method: ner` (read cheaply: no YAML parser at interpreter start).

    The recipe is the first argument that is a readable file: an option's value
    (`--out-shard-size 1M`) may come before it, and OUT is a folder.
    """
    if _program(argv) != "mergekit-yaml":
        return False
    for argument in argv[1:]:
        if argument.startswith("-") or not os.path.isfile(argument):
            continue
        try:
            with open(argument, encoding="utf-8") as file:
                lines = file.read(1 << 16).splitlines()
        except (OSError, ValueError):
            return False
        wanted = {"merge_method:ner", "merge_method:'ner'", 'merge_method:"ner"'}
        return any(line.split("#")[0].replace(" ", "") in wanted for line in lines)
    return False


def _interrupted_while_starting(kind, value, traceback) -> None:
    """sys.excepthook of `ner-merge` and NER merges: Ctrl-C while Python starts
    (mergekit and torch take seconds to import) is one line, not a traceback of
    the imports; every other exception is shown as before. Python then exits as
    a process ended by Ctrl-C does."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    program = os.path.basename(sys.argv[0])
    print(f"\n{program}: interrupted; nothing was written", file=sys.stderr)


def install() -> None:
    """Add the finder once; modules already imported are handled at once."""
    if os.environ.get(DISABLE_VARIABLE) == "1":
        return
    argv = getattr(sys, "argv", [])  # absent in an embedded interpreter
    ner_merge = _is_ner_merge(argv)  # reads the recipe: once
    if ner_merge:
        from ner_merge.scoring.threads import wait_passively

        wait_passively()
    if ner_merge or _program(argv) == "ner-merge":
        sys.excepthook = _interrupted_while_starting
    if any(isinstance(finder, _AfterImportFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _AfterImportFinder())
    for name, action in AFTER_IMPORT.items():
        if name in sys.modules:
            _attach(sys.modules[name], action)


install()
