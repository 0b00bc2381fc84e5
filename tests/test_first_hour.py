"""A newcomer's slips, named at once; one grammar for every command; Ctrl-C
ending in one line and the right state (issue 24)."""

import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from mergekit.scripts.run_yaml import main as mergekit_yaml

from ner_merge.cli import main
from ner_merge.host import pipeline
from ner_merge.host.output import MANIFEST_FILE, OutputFolder
from ner_merge.recipe.recipe import _edits_apart
from tests.helpers import snapshot, write_recipe

REPOSITORY = Path(__file__).resolve().parents[1]
# The README and the pages behind it: every command line a reader may copy.
DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
COMMANDS = ("plan", "show", "eval", "compare", "demo", "generate")
NER_MERGE = str(Path(sys.executable).parent / "ner-merge")


def _slip_recipe(tmp_path: Path, trio: dict[str, Path], method: str) -> Path:
    path = write_recipe(tmp_path / "r.yml", trio["base"], [trio["one"]])
    document = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**document, "merge_method": method}))
    return path


def _one_edit_from(word: str, alphabet: str) -> set[str]:
    """Every string one letter added, dropped, changed or swapped away: the
    definition of a slip, spelt out (the reference for `_edits_apart`)."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    return (
        {a + b[1:] for a, b in splits if b}
        | {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
        | {a + c + b[1:] for a, b in splits if b for c in alphabet}
        | {a + c + b for a, b in splits for c in alphabet}
    )


def test_edit_distance_of_one_is_exactly_one_slip():
    alphabet = "nerx"
    close = _one_edit_from("ner", alphabet) | {"ner"}
    for length in range(1, 6):
        for letters in itertools.product(alphabet, repeat=length):
            word = "".join(letters)
            assert (_edits_apart(word, "ner") <= 1) == (word in close), word


@pytest.mark.parametrize("method", ["nerr", "NER", "ne", "nre"])
def test_a_slip_for_ner_gets_one_line_and_writes_nothing(tmp_path, qwen_trio, method):
    recipe = _slip_recipe(tmp_path, qwen_trio, method)
    before = sorted(os.listdir(tmp_path))
    done = CliRunner().invoke(mergekit_yaml, [str(recipe), str(tmp_path / "out")])
    assert done.exit_code == 1, done.output
    assert done.output == (
        f"Error: {recipe}: merge_method: {method!r} is not a merge method; "
        "did you mean ner?\n"
    )
    assert sorted(os.listdir(tmp_path)) == before
    planned = CliRunner().invoke(main, ["plan", str(recipe), "--show"])
    assert planned.exit_code == 1
    assert "did you mean ner?" in planned.output


def test_other_methods_names_stay_mergekits(tmp_path, qwen_trio):
    """A typo of `linear` is mergekit's to report, in its own words."""
    recipe = _slip_recipe(tmp_path, qwen_trio, "linera")
    done = CliRunner().invoke(mergekit_yaml, [str(recipe), str(tmp_path / "out")])
    assert isinstance(done.exception, RuntimeError)
    assert str(done.exception) == "Unimplemented merge method linera"


def test_every_pattern_that_matches_nothing_is_named_in_one_run(tmp_path, qwen_trio):
    recipe = write_recipe(
        tmp_path / "r.yml",
        qwen_trio["base"],
        [qwen_trio["one"]],
        keep_base="embed_tokens,lm_head,model.norm.weight",
    )
    document = yaml.safe_load(recipe.read_text())
    document["models"][0]["parameters"] = {"exclude": "self_attn"}
    recipe.write_text(yaml.safe_dump(document))
    done = CliRunner().invoke(main, ["plan", str(recipe), "--show"])
    assert done.exit_code == 1
    lines = done.output.removeprefix("Error: ").splitlines()
    bad = [("keep_base", "embed_tokens"), ("keep_base", "lm_head")]
    bad += [(f"exclude of model {qwen_trio['one']}", "self_attn")]
    assert len(lines) == len(bad)
    for line, (option, pattern) in zip(lines, bad):
        assert line.startswith(
            f"{recipe}: parameters.{option}: pattern {pattern!r} matches no tensor"
        )
        assert line.endswith(
            f"did you mean '*{pattern}*'? A pattern matches whole names"
        )


@pytest.mark.parametrize(
    "name, content",
    [
        ("config.json", json.dumps({"architectures": ["Qwen2ForCausalLM"]})),
        ("README.md", "# a model card\n"),
        ("list.json", "[1, 2]"),
        ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}\xff\xfe"),
    ],
)
def test_show_says_in_one_line_that_a_file_is_no_source_map(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    done = CliRunner().invoke(main, ["show", str(path)])
    assert done.exit_code == 1
    assert len(done.output.splitlines()) == 1
    assert done.output.startswith(f"Error: {path}: not a source map (")


def _options(command: click.Command) -> set[str]:
    return {name for p in command.params for name in p.opts + p.secondary_opts}


def test_one_grammar_for_every_command():
    """The output switches on every command (and before its name), the device
    options wherever something runs on a device, -t wherever texts are scored."""
    assert {"-v", "--verbose", "--quiet"} <= _options(main)
    for name in COMMANDS:
        options = _options(main.commands[name])
        assert {"-v", "--verbose", "--quiet"} <= options, name
        assert ({"--device", "--cuda"} <= options) == (
            name in ("plan", "eval", "compare")
        ), name
        assert ("-t" in options) == (name in ("eval", "compare")), name
    helps = {
        option: {
            p.help
            for command in [main, *main.commands.values()]
            for p in command.params
            if option in p.opts
        }
        for option in ("--device", "--cuda", "-t", "--quiet", "-v")
    }
    assert all(len(texts) == 1 for texts in helps.values()), helps  # one meaning


def test_switches_mean_the_same_before_and_after_the_command(tmp_path, qwen_trio):
    text = tmp_path / "t.txt"
    text.write_text("the sea and the kitchen, " * 4)
    model = str(qwen_trio["base"])
    runs = {}
    for args in (
        ["--quiet", "eval", model, "-t", str(text)],
        ["eval", model, "-t", str(text), "--quiet"],
        ["eval", model, "-t", str(text)],
    ):
        done = subprocess.run(
            [NER_MERGE, *args, "--device", "cpu"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        runs[" ".join(args)] = done
    quiet_before, quiet_after, plain = runs.values()
    assert quiet_before.stderr == quiet_after.stderr == ""
    assert plain.stderr == f"[1/1] {model}\n"
    assert quiet_before.stdout == quiet_after.stdout == plain.stdout
    both = CliRunner().invoke(main, ["-v", "eval", model, "--quiet"])
    assert both.exit_code == 2 and "-v and --quiet: choose one" in both.output


def test_compare_takes_the_device_options_and_refuses_a_bad_device_first(
    tmp_path, qwen_trio
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    text = tmp_path / "t.txt"
    text.write_text("the sea and the kitchen, " * 4)
    args = ["compare", str(recipe), "-t", str(text), "-o", str(tmp_path / "c")]
    done = CliRunner().invoke(main, [*args, "--device", "meta", "-v"])
    assert done.exit_code == 1
    assert "--device meta: torch cannot score on this device" in done.output
    assert sorted(os.listdir(tmp_path)) == ["r.yml", "t.txt"]


# `ner-merge [OPTIONS] COMMAND ...` or `COMMAND -x ...` in the documents' code.
COMMAND_LINE = re.compile(
    r"^(?:ner-merge((?:\s+-\S+)*)\s+)?(" + "|".join(COMMANDS) + r")((?:\s+\S+)*)$"
)


def _documented_command_lines() -> list[tuple[str, str]]:
    """Each code span and indented code line of the documents, with its file."""
    lines = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        spans = re.findall(r"`([^`\n]+)`", text)
        spans += [line.strip() for line in text.splitlines() if line.startswith("    ")]
        lines += [(document.name, span.split("#")[0].strip()) for span in spans]
    return lines


def test_every_option_the_documents_name_exists_on_its_command():
    named = Counter()
    for document, line in _documented_command_lines():
        match = COMMAND_LINE.match(line)
        if not match or not (line.startswith("ner-merge") or " -" in line):
            continue
        before, name, after = match.groups()
        for option in (before or "").split():
            assert option in _options(main), f"{document}: {line}"
        for token in (after or "").split():
            option = token.strip("[].,;:()").split("=")[0]
            if option.startswith("-") and len(option) > 1:
                assert option in _options(main.commands[name]), f"{document}: {line}"
                named[document] += 1
    # The documents do name options, the README and the pages behind it alike:
    # the test reads them all.
    assert named["README.md"] >= 5 and sum(named.values()) >= 12, named


def _published_then_interrupted(self, staging):
    """OutputFolder._publish, then a Ctrl-C: the merge is complete and in place."""
    PUBLISH(self, staging)
    raise KeyboardInterrupt


PUBLISH = OutputFolder._publish


def test_ctrl_c_before_publishing_leaves_nothing(tmp_path, qwen_trio, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_report", interrupted)
    out = str(tmp_path / "out")
    done = CliRunner().invoke(mergekit_yaml, ["--quiet", str(recipe), out])
    assert done.exit_code == 130
    assert done.output.strip() == (
        f"mergekit-yaml: interrupted; nothing was written ({tmp_path / 'out'} is "
        "as it was)"
    )
    assert sorted(os.listdir(tmp_path)) == ["r.yml"]  # no OUT, staging or lock


def test_ctrl_c_once_published_reports_the_merge_done(tmp_path, qwen_trio, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    plain = CliRunner().invoke(mergekit_yaml, [str(recipe), str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    monkeypatch.setattr(OutputFolder, "_publish", _published_then_interrupted)
    out = tmp_path / "out"
    done = CliRunner().invoke(mergekit_yaml, [str(recipe), str(out)])
    assert done.exit_code == 0, done.output
    assert f"interrupted after {out} was written: complete" in done.output
    assert f"NER merge written to {out}" in done.output
    # The whole merge: every file, the weights and map byte for byte (the report
    # has the time, the card OUT's name).
    merged, reference = snapshot(out), snapshot(tmp_path / "plain")
    assert merged.keys() == reference.keys()
    for name in ("model.safetensors", "ner_source_map.json", "config.json"):
        assert merged[name] == reference[name]
    assert sorted(os.listdir(tmp_path)) == ["out", "plain", "r.yml"]


def test_ctrl_c_in_a_command_is_one_line(tmp_path, qwen_trio, monkeypatch):
    import ner_merge.evaluate.perplexity

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(ner_merge.evaluate.perplexity, "evaluate", interrupted)
    done = CliRunner().invoke(main, ["eval", str(qwen_trio["base"])])
    assert done.exit_code == 130
    assert done.output.strip() == "ner-merge eval: interrupted; nothing was written"


def test_ctrl_c_while_python_starts_is_one_line(tmp_path, qwen_trio):
    """The hook turns an interrupt during the seconds of imports into one line,
    for NER merges only: a program named mergekit-yaml, an NER recipe."""
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    program = tmp_path / "mergekit-yaml"
    program.write_text("raise KeyboardInterrupt  # as if during an import\n")
    done = subprocess.run(
        [sys.executable, str(program), str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode in (130, -signal.SIGINT)
    assert done.stderr.strip() == "mergekit-yaml: interrupted; nothing was written"
    other = subprocess.run(  # another program keeps Python's own traceback
        [sys.executable, str(program)], capture_output=True, text=True, timeout=60
    )
    assert "Traceback" in other.stderr


# A real SIGINT once mergekit-yaml has returned from a merge: the process is
# ending, OUT is published.
INTERRUPT_AS_IT_EXITS = """
import os, signal, sys, time
from mergekit.scripts.run_yaml import main
sys.argv = ["mergekit-yaml", *sys.argv[1:]]
main(standalone_mode=False)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(30)
"""


def test_ctrl_c_as_a_finished_merge_exits_is_exit_code_0(tmp_path, qwen_trio):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPT_AS_IT_EXITS, str(recipe), str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"mergekit-yaml: {out} is complete"
    assert (out / MANIFEST_FILE).exists()
