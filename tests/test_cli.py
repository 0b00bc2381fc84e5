"""The `ner-merge` command as a user meets it: quick to start, clear when refusing,
and refusing before any tensor is scored."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ner_merge import __version__
from ner_merge.cli import main
from ner_merge.plan.source_map import SOURCE_MAP_FILE, SourceMap
from tests import pico
from tests.helpers import small_source_map, write_recipe


def _hand_made_map(path: Path) -> Path:
    small_source_map().save(path)
    return path


def _empty(folder: Path) -> bool:
    return not any(folder.rglob("*"))


def test_help_and_show_import_neither_torch_nor_mergekit(tmp_path):
    """What makes `--help` take seconds: importing torch, mergekit, the planner."""
    source_map = _hand_made_map(tmp_path / "plan.json")
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from ner_merge.cli import main\n"
        "for args in (['--help'], ['--version'], ['show', sys.argv[1]]):\n"
        "    done = CliRunner().invoke(main, args)\n"
        "    assert done.exit_code == 0, done.output\n"
        "heavy = {'torch', 'mergekit', 'transformers', 'ner_merge.plan.planner'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(source_map)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version_and_help_say_how_to_merge():
    version = CliRunner().invoke(main, ["--version"])
    assert version.exit_code == 0
    assert version.output.startswith(f"ner-merge {__version__} (mergekit ")
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "mergekit-yaml RECIPE OUT" in help_text


def test_show_takes_a_merge_output_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _hand_made_map(out / SOURCE_MAP_FILE)
    from_file = CliRunner().invoke(main, ["show", str(out / SOURCE_MAP_FILE)])
    from_folder = CliRunner().invoke(main, ["show", str(out)])
    assert from_file.exit_code == 0, from_file.output
    assert from_folder.exit_code == 0 and from_folder.output == from_file.output

    no_map = CliRunner().invoke(main, ["show", str(tmp_path)])
    assert no_map.exit_code == 1
    assert f"{tmp_path}: no {SOURCE_MAP_FILE} in this folder" in no_map.output


def test_plan_creates_the_output_folder(tmp_path, qwen_trio, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(main, ["plan", str(recipe), "-o", "new/dir/plan.json"])
    assert done.exit_code == 0, done.output
    assert SourceMap.load(tmp_path / "new/dir/plan.json").tensors


@pytest.mark.parametrize("blocked", ["file", "read-only"])
def test_an_unwritable_output_is_refused_before_scoring(
    tmp_path, qwen_trio, isolated_score_cache, blocked
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    if blocked == "file":
        (tmp_path / "afile").write_text("")
        output, says = tmp_path / "afile/sub/plan.json", "is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        output, says = locked / "plan.json", "cannot write in"
    done = CliRunner().invoke(main, ["plan", str(recipe), "-o", str(output)])
    assert done.exit_code == 1
    message = done.output.strip()
    assert message.count("\n") == 0 and says in message and str(output) in message
    assert _empty(isolated_score_cache)  # refused before any tensor was scored


def test_plan_overwrites_a_map_but_never_another_file(
    tmp_path, qwen_trio, isolated_score_cache
):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    done = CliRunner().invoke(main, ["plan", str(recipe), "-o", str(notes)])
    assert done.exit_code == 1 and "exists and is not a source map" in done.output
    assert str(notes) in done.output and notes.read_text() == '{"mine": true}'
    assert _empty(isolated_score_cache)  # refused before any tensor was scored
    plan_file = tmp_path / "plan.json"
    for _ in range(2):  # the second run replaces the map the first one wrote
        done = CliRunner().invoke(main, ["plan", str(recipe), "-o", str(plan_file)])
        assert done.exit_code == 0, done.output
    assert SourceMap.load(plan_file).tensors


@pytest.mark.parametrize(
    "change, says",
    [
        ({"dtype": "bf16"}, "dtype: 'bf16' is not a floating-point dtype"),
        ({"paramters": {"granularity": "layer"}}, "did you mean parameters?"),
        ({"parameters": {"weight": 0.5}}, "takes no weights"),
    ],
)
def test_plan_refuses_a_bad_recipe_before_scoring(
    tmp_path, qwen_trio, isolated_score_cache, change, says
):
    import yaml

    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    document = yaml.safe_load(recipe.read_text()) | change
    recipe.write_text(yaml.safe_dump(document))
    done = CliRunner().invoke(main, ["plan", str(recipe), "--show"])
    assert done.exit_code == 1
    assert f"Error: {recipe}: " in done.output and says in done.output
    assert _empty(isolated_score_cache)


def test_eval_names_a_folder_without_a_model_before_loading_any(tmp_path, qwen_trio):
    text = tmp_path / "t.txt"
    text.write_text("The cook stirred the pot while the boat rocked.")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    no_tokenizer = tmp_path / "no-tokenizer"
    pico.base_model("qwen2").to(torch.bfloat16).save_pretrained(no_tokenizer)
    for folder, says in [
        (empty, "no config.json in it, so it is not a model folder"),
        (no_weights, "no weights in it"),
        (no_tokenizer, "tokenizer"),
    ]:
        done = CliRunner().invoke(
            main, ["eval", str(qwen_trio["base"]), str(folder), "-t", str(text)]
        )
        assert done.exit_code == 1
        assert f"{folder}: cannot load a causal language model" in done.output
        assert says in done.output
        assert "[1/2]" not in done.stderr  # refused before the first model loaded


def test_eval_prints_a_progress_line_per_model_unless_quiet(tmp_path, qwen_trio):
    text = tmp_path / "t.txt"
    text.write_text("The cook stirred the pot while the boat rocked.")
    models = [str(qwen_trio["base"]), str(qwen_trio["one"])]
    args = ["eval", *models, "-t", str(text), "--device", "cpu"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert done.stderr.splitlines() == [f"[1/2] {models[0]}", f"[2/2] {models[1]}"]
    assert "[1/2]" not in done.stdout  # the table alone, for pipes
    quiet = CliRunner().invoke(main, [*args, "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert quiet.stdout == done.stdout


@pytest.mark.parametrize(
    "options, says",
    [
        (["--device", "meta"], "--device meta: torch cannot score on this device"),
        (["--cuda"], "--cuda: torch cannot score on this device"),
    ],
    ids=["meta", "cuda"],
)
def test_plan_refuses_a_device_it_cannot_score_on_before_scoring(
    tmp_path, qwen_trio, isolated_score_cache, options, says
):
    if options == ["--cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    done = CliRunner().invoke(main, ["plan", str(recipe), "--show", *options])
    assert done.exit_code == 1
    message = done.output.strip()
    assert message.count("\n") == 0 and message.startswith(f"Error: {says} (")
    assert _empty(isolated_score_cache)


def test_plan_scores_on_the_device_given(tmp_path, qwen_trio):
    recipe = write_recipe(tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"]])
    args = ["plan", str(recipe), "--quiet", "-o"]
    default = CliRunner().invoke(main, [*args, str(tmp_path / "a.json")])
    on_cpu = CliRunner().invoke(
        main, [*args, str(tmp_path / "b.json"), "--device", "cpu"]
    )
    assert default.exit_code == 0 and on_cpu.exit_code == 0, on_cpu.output
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_plan_refuses_one_model_under_two_spellings(
    tmp_path, qwen_trio, isolated_score_cache
):
    link = tmp_path / "sea"
    link.symlink_to(qwen_trio["one"])
    recipe = write_recipe(
        tmp_path / "r.yml", qwen_trio["base"], [qwen_trio["one"], link]
    )
    done = CliRunner().invoke(main, ["plan", str(recipe), "--show"])
    assert done.exit_code == 1
    assert done.output.strip() == (
        f"Error: {recipe}: models {qwen_trio['one']} and {link} are one folder "
        f"({qwen_trio['one']}); list each model once"
    )
    assert _empty(isolated_score_cache)
