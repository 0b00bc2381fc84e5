"""The import hook: cheap at start-up, idempotent, and never fatal to mergekit."""

import subprocess
import sys

from mergekit.merge_methods import registry

from ner_merge.method import register


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
        "import sys; sys.modules['ner_merge.method'] = None\n"
        "import mergekit.merge_methods as mm\n"
        "print(mm.get('linear').spec.name)"
    )
    assert done.returncode == 0
    assert done.stdout.strip() == "linear"
    assert "ner-merge: could not attach to mergekit.merge_methods" in done.stderr


def test_the_hook_can_be_switched_off():
    done = subprocess.run(
        [sys.executable, "-c", "import sys; print('ner_merge.hook' in sys.modules)"],
        capture_output=True,
        text=True,
        env={"NER_MERGE_DISABLE_HOOK": "1", "PATH": ""},
    )
    assert done.stdout.strip() == "True"  # imported, but installs no finder
