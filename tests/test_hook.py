"""The import hook: cheap at start-up, idempotent, and never fatal to mergekit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mergekit.merge_methods import registry

from ner_merge.hook import DISABLE_VARIABLE
from ner_merge.host.method import register
from tests.helpers import write_recipe

HOOK_SOURCE = Path(__file__).resolve().parents[1] / "ner_merge" / "hook.py"


def python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_startup_imports_neither_torch_nor_mergekit():
    done = python("pass", "-X", "importtime")
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "ner_merge.hook" in imported  # the hook is installed and did run
    assert not {
        name for name in imported if name.split(".")[0] in ("torch", "mergekit")
    }


def test_registering_twice_is_harmless():
    register()
    register()
    names = [method.spec.name for method in registry.registered_methods()]
    assert names.count("ner") == 1


def test_stock_mergekit_sees_the_method_and_run_merge_is_wrapped():
    done = python(
        "import mergekit.merge as m, mergekit.merge_methods as mm;"
        "print(mm.get('ner').spec.pretty_name, m.run_merge.__code__.co_name)"
    )
    assert done.stdout.split() == ["NER", "layer", "selection", "run_merge_with_ner"]


def test_a_broken_hook_says_what_broke_and_mergekit_still_works():
    done = python(
        "import sys; sys.modules['ner_merge.host.method'] = None\n"
        "import mergekit.merge_methods as mm\n"
        "print(mm.get('linear').spec.name)"
    )
    assert done.returncode == 0
    assert done.stdout.strip() == "linear"
    assert "ner-merge: could not attach to mergekit.merge_methods" in done.stderr


# What the hook does, seen from a fresh interpreter: whether its finder is on
# sys.meta_path, whether mergekit knows `merge_method: ner`, and whether
# run_merge is wrapped. The first line names the hook module that ran.
HOOK_EFFECTS = """
import sys
import ner_merge.hook as hook
import mergekit.merge as merge, mergekit.merge_methods as methods
try:
    methods.get("ner")
    known = True
except RuntimeError:
    known = False
print(hook.__file__)
print(sum(type(f).__module__ == "ner_merge.hook" for f in sys.meta_path), known,
      merge.run_merge.__code__.co_name)
"""


def hook_effects(switch: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != DISABLE_VARIABLE}
    if switch is not None:
        env[DISABLE_VARIABLE] = switch
    done = subprocess.run(
        [sys.executable, "-c", HOOK_EFFECTS],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "ner-merge:" not in done.stderr  # nothing half-attached
    hook_file, effects = done.stdout.splitlines()
    assert Path(hook_file) == HOOK_SOURCE  # this working tree's hook ran
    return effects.split()


def test_the_hook_can_be_switched_off():
    assert hook_effects(switch="1") == ["0", "False", "run_merge"]
    # Without the switch the very same probe sees the hook at work.
    assert hook_effects(switch=None) == ["1", "True", "run_merge_with_ner"]


def test_passive_threads_only_for_ner_merges(tmp_path):
    from ner_merge.hook import _is_ner_merge

    ner = tmp_path / "ner.yml"
    ner.write_text("models: []\nmerge_method: ner  # ours\n")
    linear = tmp_path / "linear.yml"
    linear.write_text("merge_method: linear\n# merge_method: ner\n")
    assert _is_ner_merge(["/venv/bin/mergekit-yaml", str(ner), "out", "--cuda"])
    assert _is_ner_merge(["mergekit-yaml", "--quiet", str(ner), "out"])
    assert _is_ner_merge(["mergekit-yaml", "--out-shard-size", "1M", str(ner), "o"])
    assert _is_ner_merge(["/venv/Scripts/mergekit-yaml.exe", str(ner), "out"])
    assert not _is_ner_merge(["mergekit-yaml", str(linear), "out"])
    assert not _is_ner_merge(["mergekit-yaml", str(tmp_path / "missing.yml")])
    assert not _is_ner_merge(["python", str(ner)])
    assert not _is_ner_merge([])
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(  # any other program: untouched
        [sys.executable, "-c", "import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert done.stdout.strip() == "None"


def test_a_merge_ends_saying_where_its_files_are_and_hides_mergekits_notice(
    tmp_path, qwen_trio, isolated_score_cache
):
    """`mergekit-yaml` with an NER recipe ends with where the report, figure and
    map are and the number of decisions (on stdout, --quiet or not); --quiet
    prints nothing else. transformers' notice about mergekit's use of
    `torch_dtype` is hidden in NER merges, and only there: a linear merge, which
    is mergekit's alone, still shows it."""
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    mergekit_yaml = str(Path(sys.executable).parent / "mergekit-yaml")
    out = tmp_path / "out"
    said = {}
    for flags in (["--quiet"], []):
        done = subprocess.run(
            [mergekit_yaml, *flags, str(recipe), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        said[bool(flags)] = done
    document = json.loads((out / "ner_source_map.json").read_text())
    deciders = {
        choice.get("unit") or name
        for name, choice in document["tensors"].items()
        if choice["scores"]
    }
    summary = (
        f"NER merge written to {out}: {len(document['tensors'])} tensors, "
        f"{len(deciders)} decisions (0 near ties refined in float64)\n"
        f"  report: {out / 'ner_report.md'}\n"
        f"  figure: {out / 'ner_report.png'}\n"
        f"  map:    {out / 'ner_source_map.json'}\n"
    )
    assert all((out / name).is_file() for name in ("ner_report.md", "ner_report.png"))
    assert said[True].stdout == said[False].stdout == summary
    assert said[True].stderr == ""
    assert "NER scoring" in said[False].stderr
    assert "Executing graph" in said[False].stderr
    assert "torch_dtype" not in said[False].stderr
    linear = tmp_path / "linear.yml"
    document = yaml.safe_load(recipe.read_text())
    average = {"merge_method": "linear", "parameters": {"weight": 1.0}}
    linear.write_text(yaml.safe_dump({**document, **average}))
    done = subprocess.run(
        [mergekit_yaml, str(linear), str(tmp_path / "linear")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "`torch_dtype` is deprecated" in done.stderr


@pytest.mark.parametrize(
    "program, ours",
    [
        ("/venv/bin/ner-merge", True),
        ("/venv/Scripts/ner-merge.exe", True),  # Windows' console scripts
        ("/venv/Scripts/mergekit-yaml.exe", True),
        ("/usr/bin/python3", False),
        ("ner-merged", False),
    ],
)
def test_our_commands_own_their_ctrl_c_on_every_platform(monkeypatch, program, ours):
    """Only `ner-merge` and `mergekit-yaml` (with or without `.exe`) take over
    Ctrl-C; a Python session using mergekit's API keeps its own."""
    from ner_merge.host.interrupt import from_command_line

    monkeypatch.setattr(sys, "argv", [program])
    assert from_command_line() is ours
