"""The package layout: no import runs back up.

ner_merge's packages are layered as data flows, bottom to top; a module may
import from its own layer and those below, never from one above, wherever the
import stands (a late import inside a function counts the same). A module at the
package's root must be given a layer here, so a new one is placed on purpose.
"""

import ast
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]

# Bottom to top (docs/layout.md says why each sits where it does).
LAYERS = (
    ("ner_merge", "ner_merge.errors"),  # the version; the errors a user can meet
    ("ner_merge.recipe",),
    ("ner_merge.models",),
    ("ner_merge.scoring",),
    ("ner_merge.plan",),
    ("ner_merge.report",),
    ("ner_merge.host",),
    ("ner_merge.demo",),
    ("ner_merge.evaluate",),
    ("ner_merge.cli", "ner_merge.hook"),  # the entry points: the command, the hook
)


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name, or None if no layer holds it; the
    package itself holds only `ner_merge`, each other entry its submodules."""
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or (
                name != "ner_merge" and module.startswith(name + ".")
            ):
                return index
    return None


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str, is_package: bool, root: Path) -> list[str]:
    """The ner_merge modules an import statement names (relative ones resolved;
    `from P import m` names P.m when m is a module of P, else P)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".")
        package = package if is_package else package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    names = []
    for alias in node.names:
        candidate = root.joinpath(*f"{base}.{alias.name}".split("."))
        is_module = candidate.with_suffix(".py").exists() or candidate.is_dir()
        names.append(f"{base}.{alias.name}" if is_module else base)
    return names


def layout_problems(root: Path) -> list[str]:
    """Every module of root/ner_merge without a layer, and every import of a
    ner_merge module from a layer above the importer's."""
    problems = []
    for path in sorted((root / "ner_merge").rglob("*.py")):
        module = module_name(path, root)
        own = layer_of(module)
        if own is None:
            problems.append(f"{module}: in no layer (add it to LAYERS, or move it)")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            for target in imported(node, module, path.name == "__init__.py", root):
                if target.split(".")[0] != "ner_merge":
                    continue
                theirs = layer_of(target)
                if theirs is None or theirs > own:
                    problems.append(
                        f"{path.relative_to(root)}:{node.lineno}: {module} imports "
                        f"{target}, a layer above it"
                    )
    return problems


def test_no_import_runs_back_up():
    assert layout_problems(REPOSITORY) == []


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_check_finds_imports_up_late_or_relative_and_modules_in_no_layer(
    tmp_path,
):
    """The check itself, on a made-up package: the layered imports pass; an
    import from a layer above is found at the top of a module, inside a
    function, relative, and as `from package import module`."""
    root = _package(
        tmp_path,
        {
            "ner_merge/__init__.py": "",
            "ner_merge/errors.py": "",
            "ner_merge/cli.py": "from ner_merge.plan.planner import plan\n",
            "ner_merge/stray.py": "",
            "ner_merge/plan/__init__.py": "",
            "ner_merge/plan/planner.py": "from ner_merge.scoring import ner\n",
            "ner_merge/scoring/__init__.py": "",
            "ner_merge/scoring/ner.py": "from ner_merge.errors import X\n",
            "ner_merge/scoring/up.py": "from ner_merge.plan.planner import plan\n",
            "ner_merge/scoring/late.py": "def f():\n    import ner_merge.host.method\n",
            "ner_merge/scoring/relative.py": "from ..plan import planner\n",
            "ner_merge/models/__init__.py": "from ner_merge import cli\n",
        },
    )
    problems = layout_problems(root)
    assert problems == [
        "ner_merge/models/__init__.py:1: ner_merge.models imports ner_merge.cli, "
        "a layer above it",
        "ner_merge/scoring/late.py:2: ner_merge.scoring.late imports "
        "ner_merge.host.method, a layer above it",
        "ner_merge/scoring/relative.py:1: ner_merge.scoring.relative imports "
        "ner_merge.plan.planner, a layer above it",
        "ner_merge/scoring/up.py:1: ner_merge.scoring.up imports "
        "ner_merge.plan.planner, a layer above it",
        "ner_merge.stray: in no layer (add it to LAYERS, or move it)",
    ]
