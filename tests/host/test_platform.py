"""Every platform mergekit runs on, and a hook that attaches all or nothing.

What macOS and Windows lack is taken away here, as those systems lack it: no
`fcntl` (Windows), no `os.sysconf` (Windows; macOS lacks the page count it was
asked for), no `/proc` and no `os.sched_getaffinity` (both). A merge still runs
whole. And a mergekit the hook cannot fully attach to (a part fails, or its
version is outside the supported range) refuses an NER recipe outright, while
its own methods keep working.
"""

import builtins
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ner_merge.errors import NerMergeError
from ner_merge.host import mergekit_range
from ner_merge.host.output import MANIFEST_FILE
from ner_merge.plan.source_map import SOURCE_MAP_FILE
from ner_merge.report.markdown import REPORT_FILE
from ner_merge.scoring import workers
from tests.helpers import write_recipe
from tests.test_merge import MERGEKIT_YAML

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ner_merge"

# Unix-only modules and calls, none of which any module of the package may use.
UNIX_ONLY = [
    r"\bimport (fcntl|resource|pwd|grp|termios|tty)\b",
    r"\bos\.(sysconf|getuid|geteuid|getgid|fork|killpg|getpgid|umask)\(",
    r"\bsignal\.(SIGKILL|SIGALRM|SIGHUP|SIGUSR1|alarm)\b",
    r"['\"]/proc/",
    r"['\"]/dev/shm",
]


def test_no_unix_only_module_or_call_in_the_package():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(re.search(pattern, line) for pattern in UNIX_ONLY)
    ]
    assert found == []


@pytest.fixture
def like_macos_or_windows(monkeypatch):
    """No /proc, os.sysconf or os.sched_getaffinity; psutil reports memory as it
    does there (from the system's own call), here a known figure."""
    real_open = builtins.open

    def open_without_proc(file, *args, **kwargs):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_without_proc)
    monkeypatch.delattr(os, "sysconf")
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    available = 10 << 30
    monkeypatch.setattr(
        workers.psutil, "virtual_memory", lambda: SimpleNamespace(available=available)
    )
    return available


def test_default_workers_need_no_proc_nor_sysconf(like_macos_or_windows):
    assert workers.available_memory() == like_macos_or_windows
    # half of 10 GiB for working sets of 1 GiB: 5 workers, fewer than 6 cores
    assert workers.default_count(1 << 30) == 5
    assert workers.default_count(4 << 30) == 1  # 5 GiB hold one 4 GiB set
    assert workers.default_count(0) == 6  # no memory bound: every core


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux")
def test_available_memory_is_the_kernels_figure():
    """On Linux the figure is MemAvailable (free memory plus what the kernel
    can drop), read here from /proc as an independent reference."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            expected = int(line.split()[1]) * 1024
    assert abs(workers.available_memory() - expected) < 0.05 * expected


# A mergekit-yaml run as on Windows or macOS: fcntl is gone before anything
# imports it; os.sysconf and os.sched_getaffinity once the libraries whose
# Linux backends use them (psutil) are loaded; of /proc, the meminfo file this
# package read. (Libraries' Linux backends read /proc themselves, threadpoolctl
# its maps, psutil its meminfo: on those systems they use other calls, so psutil
# answers here as it would there.)
WITHOUT_UNIX = r"""
import sys
sys.modules["fcntl"] = None
import builtins, os
from types import SimpleNamespace
import mergekit.merge, psutil, torch
real_open = builtins.open
def open_without_proc(file, *args, **kwargs):
    if str(file) == "/proc/meminfo":
        raise FileNotFoundError(2, "No such file or directory", str(file))
    return real_open(file, *args, **kwargs)
builtins.open = open_without_proc
del os.sysconf
if hasattr(os, "sched_getaffinity"):
    del os.sched_getaffinity
psutil.virtual_memory = lambda: SimpleNamespace(available=8 << 30)
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main()
"""


def test_a_merge_runs_whole_without_fcntl_proc_or_sysconf(
    tmp_path, qwen_trio, isolated_score_cache
):
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"], qwen_trio["two"]]
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_UNIX, str(recipe), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "ner-merge:" not in done.stderr  # the hook attached whole
    for name in (SOURCE_MAP_FILE, REPORT_FILE, MANIFEST_FILE, "model.safetensors"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]


def _linear_recipe(path: Path, trio: dict[str, Path]) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(trio[name]), "parameters": {"weight": 1.0}}
                    for name in ("base", "one")
                ],
                "dtype": "bfloat16",
            }
        )
    )
    return path


def _mergekit_yaml(recipe: Path, out: Path, pythonpath: list[Path]):
    path = os.pathsep.join([*map(str, pythonpath), str(ROOT)])
    return subprocess.run(
        [MERGEKIT_YAML, str(recipe), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=path),
    )


def _only_linear_merges(tmp_path: Path, trio: dict[str, Path], pythonpath) -> str:
    """Run an NER and a linear recipe through the stock mergekit-yaml: the NER
    one must be refused by mergekit, with nothing written, and the linear one
    must merge. Returns the ner-merge line both runs printed."""
    ner = write_recipe(tmp_path / "ner.yml", trio["base"], [trio["one"]])
    refused = _mergekit_yaml(ner, tmp_path / "ner-out", pythonpath)
    assert refused.returncode != 0
    assert "Unimplemented merge method ner" in refused.stderr
    assert not (tmp_path / "ner-out").exists()
    linear = _linear_recipe(tmp_path / "linear.yml", trio)
    merged = _mergekit_yaml(linear, tmp_path / "linear-out", pythonpath)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "linear-out" / "model.safetensors").is_file()
    said = [
        [line for line in run.stderr.splitlines() if line.startswith("ner-merge:")]
        for run in (refused, merged)
    ]
    assert said[0] == said[1] and len(said[0]) == 1  # one line, every run
    return said[0][0]


def test_a_part_that_cannot_attach_takes_the_method_with_it(tmp_path, qwen_trio):
    """The method registers before mergekit.merge executes; the pipeline's
    wrap of run_merge comes last. Here the wrap fails (its module cannot be
    imported, as when fcntl was missing): `ner` must be unregistered again,
    not left to merge without its plan, map and report."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(
        "import sys\nsys.modules['ner_merge.host.pipeline'] = None\n"
    )
    line = _only_linear_merges(tmp_path, qwen_trio, [broken])
    assert "could not attach to mergekit.merge" in line
    assert "merge_method 'ner' is unavailable" in line


def _fake_mergekit(root: Path, version: str) -> Path:
    """A folder whose distribution metadata says mergekit `version`: first on
    the path, it is what importlib.metadata finds."""
    info = root / f"mergekit-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: mergekit\nVersion: {version}\n"
    )
    return root


def test_a_mergekit_outside_the_range_offers_no_ner(tmp_path, qwen_trio):
    fake = _fake_mergekit(tmp_path / "fake", "0.2.0")
    line = _only_linear_merges(tmp_path, qwen_trio, [fake])
    assert line == f"ner-merge: {mergekit_range.problem_with('0.2.0')}"
    assert "mergekit 0.2.0 is installed" in line
    assert "mergekit>=0.1.5,<0.2" in line
    assert "pip install 'mergekit>=0.1.5,<0.2'" in line
    recipe = write_recipe(tmp_path / "plan.yml", qwen_trio["base"], [qwen_trio["one"]])
    planned = subprocess.run(
        [sys.executable, "-c", "from ner_merge.cli import main; main()"]
        + ["plan", str(recipe), "--show"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(ROOT)])),
    )
    assert planned.returncode == 1
    assert planned.stderr.strip().splitlines() == [f"Error: {line[11:]}"]


@pytest.mark.parametrize(
    "version, supported",
    [
        ("0.1.5", True),
        ("0.1.9", True),
        ("0.1.6rc1", True),
        ("0.1.4", False),
        ("0.2.0", False),
        ("0.2.0rc1", False),
        ("1.0.0", False),
        ("not-a-version", False),
        (None, False),
    ],
)
def test_the_range_check(monkeypatch, version, supported):
    monkeypatch.setattr(mergekit_range, "installed_mergekit", lambda: version)
    problem = mergekit_range.mergekit_problem()
    assert (problem is None) == supported
    if not supported:
        assert f"mergekit {version or '(not installed)'} is installed" in problem
        with pytest.raises(NerMergeError, match="needs mergekit>=0.1.5,<0.2"):
            mergekit_range.check_mergekit()


def test_the_range_is_the_one_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [d for d in project["dependencies"] if d.startswith("mergekit")]
    assert declared == [f"mergekit{mergekit_range.MERGEKIT_RANGE}"]
