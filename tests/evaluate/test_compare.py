"""`ner-merge compare`: its table holds each folder's perplexity computed here,
its files read back as that table, its plain average is the mean of the inputs,
its recipes really differ, its output is reproducible (determinism), and every
refusal comes before any scoring or merging, in one line, leaving nothing
written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from ner_merge.cli import main
from ner_merge.demo import TEXTS
from ner_merge.models.cache_folder import CACHE_DIR_VARIABLE
from ner_merge.plan.source_map import SOURCE_MAP_FILE
from tests.helpers import (
    load_tensors,
    reference_strided_perplexity,
    snapshot,
    twin,
    write_recipe,
)

CHARACTERS = 400  # of each held-out text: a few windows of the pico models
RECIPES = {"tensor": {}, "layer": {"granularity": "layer"}}
TEXT_NAMES = ("sea", "kitchen")  # DIR/NAME.txt: held-out prose of each domain


def _workspace(root: Path, trio: dict[str, Path]) -> Path:
    """A user's folder: copies of the trio, a recipe per granularity, two texts."""
    for name, folder in trio.items():
        shutil.copytree(folder, root / "models" / name)
    models = [Path("models/one"), Path("models/two")]
    for name, parameters in RECIPES.items():
        write_recipe(root / f"{name}.yml", Path("models/base"), models, **parameters)
    for domain in TEXT_NAMES:
        text = (TEXTS / f"heldout_{domain}.txt").read_text()[:CHARACTERS]
        (root / f"{domain}.txt").write_text(text)
    return root


def _compare(*arguments: str):
    return CliRunner().invoke(
        main,
        ["compare", *RECIPES_FILES, "--linear", "-t", "sea.txt", "-t", "kitchen.txt"]
        + list(arguments),
    )


RECIPES_FILES = [f"{name}.yml" for name in RECIPES]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, qwen_trio) -> Path:
    """One comparison of both recipes and the average, in a workspace as cwd,
    with a score cache of its own (the per-test one is not set up yet)."""
    root = _workspace(tmp_path_factory.mktemp("compare"), qwen_trio)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv(CACHE_DIR_VARIABLE, str(tmp_path_factory.mktemp("cache")))
        done = _compare("-o", "out")
    assert done.exit_code == 0, done.output
    (root / "stdout.txt").write_text(done.stdout)
    (root / "stderr.txt").write_text(done.stderr)
    return root


INPUTS = ["models/base", "models/one", "models/two"]
ROWS = INPUTS + ["tensor.yml", "layer.yml", "linear"]
FOLDERS = INPUTS + ["out/tensor", "out/layer", "out/linear"]


def _reference_perplexity(folder: Path, text: Path) -> float:
    """The folder's perplexity on the text, from transformers' own loss in
    windows of its whole context (`reference_strided_perplexity`)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).eval()
    tokens = torch.tensor(tokenizer(text.read_text())["input_ids"])
    with torch.inference_mode():
        window = model.config.max_position_embeddings
        return reference_strided_perplexity(model, tokens, window)


def test_compare_json_holds_each_folders_perplexity_and_the_best(compared):
    document = json.loads((compared / "out" / "compare.json").read_text())
    assert [row["name"] for row in document["rows"]] == ROWS
    assert [text["name"] for text in document["texts"]] == list(TEXT_NAMES)
    for text in TEXT_NAMES:
        reference = {
            label: _reference_perplexity(compared / folder, compared / f"{text}.txt")
            for label, folder in zip(ROWS, FOLDERS)
        }
        for row in document["rows"]:
            saved = row["perplexity"][text]
            assert saved == pytest.approx(reference[row["name"]], rel=1e-5), row
        assert document["best"][text] == min(reference, key=reference.get)


def _markdown_columns(markdown: str) -> dict[str, list[str]]:
    """The table of compare.md, column by column: header -> cells, top down."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header, _, *rows = (line.strip("|").split("|") for line in lines)
    cells = [[cell.strip() for cell in row] for row in rows]
    return {name.strip(): list(column) for name, column in zip(header, zip(*cells))}


def _printed_columns(printed: str) -> dict[str, list[str]]:
    """The table printed on stdout, column by column: header -> cells."""
    header, *rows = (line.split() for line in printed.splitlines()[1:])
    return {name: list(column) for name, column in zip(header, zip(*rows))}


def test_compare_md_and_the_printed_table_read_back_as_compare_json(compared):
    """Column by column, each cell is compare.json's value to two decimals; the
    lowest of each column (found here) bold in compare.md, starred when printed."""
    document = json.loads((compared / "out" / "compare.json").read_text())
    markdown = _markdown_columns((compared / "out" / "compare.md").read_text())
    printed = _printed_columns((compared / "stdout.txt").read_text())
    assert list(markdown) == list(printed) == ["model", *TEXT_NAMES]
    assert markdown["model"] == printed["model"] == ROWS
    for text in TEXT_NAMES:
        values = [row["perplexity"][text] for row in document["rows"]]
        lowest = min(values)
        assert markdown[text] == [
            f"**{v:.2f}**" if v == lowest else f"{v:.2f}" for v in values
        ], text
        assert printed[text] == [f"{v:.2f}" + "*" * (v == lowest) for v in values]


def test_the_plain_average_is_the_mean_of_the_inputs(compared):
    """Every tensor of out/linear is the inputs' mean, computed here in float32
    and rounded to the recipes' dtype (bfloat16), bit for bit."""
    inputs = [load_tensors(compared / folder) for folder in INPUTS]
    average = load_tensors(compared / "out" / "linear")
    assert average.keys() == inputs[0].keys()
    for name, tensor in average.items():
        copies = [model[name] for model in inputs]
        mean = (copies[0].float() + copies[1].float() + copies[2].float()) / 3
        assert tensor.dtype == torch.bfloat16, name
        differing = int((tensor != mean.to(torch.bfloat16)).sum())
        assert differing == 0, f"{name}: {differing} of {tensor.numel()} values"


def test_recipes_differing_only_in_granularity_give_different_maps(compared):
    maps = {
        name: json.loads((compared / "out" / name / SOURCE_MAP_FILE).read_text())
        for name in RECIPES
    }
    sources = {
        name: {tensor: choice["source"] for tensor, choice in m["tensors"].items()}
        for name, m in maps.items()
    }
    assert sources["tensor"].keys() == sources["layer"].keys()
    assert sources["tensor"] != sources["layer"]
    assert maps["layer"]["options"]["granularity"] == "layer"
    weights = {name: load_tensors(compared / "out" / name) for name in RECIPES}
    assert any(
        not weights["tensor"][name].equal(weights["layer"][name])
        for name in weights["tensor"]
    )


def test_progress_is_a_line_per_step_and_a_total(compared):
    lines = (compared / "stderr.txt").read_text().splitlines()
    steps = [line.split()[1:3] for line in lines[:-1]]
    assert steps[:5] == [
        ["plan", "tensor.yml"],
        ["merge", "tensor.yml"],
        ["plan", "layer.yml"],
        ["merge", "layer.yml"],
        ["merge", "linear"],
    ]
    assert [kind for kind, _ in steps[5:]] == ["eval"] * 6
    assert all(line.endswith(" s") for line in lines[:-1])
    assert lines[-1].startswith("compare: 3 merges, 6 models x 2 texts in ")


def test_determinism_the_same_inputs_give_the_same_bytes_and_a_rerun_replaces_dir(
    compared,
):
    """Run again into the same DIR (its own output: replaced) in a fresh score
    cache: every file is as before, but the report's `Created:` line."""
    before = snapshot(compared / "out")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(compared)
        done = _compare("-o", "out")
    assert done.exit_code == 0, done.output
    after = snapshot(compared / "out")
    assert after.keys() == before.keys()
    changed = [name for name in before if before[name] != after[name]]
    assert {Path(name).name for name in changed} <= {"ner_report.md"}
    for name in ("compare.json", "compare.md", "compare.png", "linear/README.md"):
        assert name in before


# --- refusals: one line each, before any work, nothing written ---------------------


@pytest.fixture
def workspace(tmp_path, qwen_trio, monkeypatch) -> Path:
    root = _workspace(tmp_path / "work", qwen_trio)
    monkeypatch.chdir(root)
    return root


def _refused(workspace: Path, cache: Path, arguments: list[str], says: str) -> None:
    before = snapshot(workspace)
    done = CliRunner().invoke(main, ["compare", *arguments])
    assert done.exit_code != 0
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and says in message[0], done.stderr
    assert snapshot(workspace) == before  # nothing deleted, nothing written
    assert not list(cache.rglob("*.json"))  # nothing scored


def _with_texts(*recipes: str) -> list[str]:
    return [*recipes, "-t", "sea.txt"]


@pytest.mark.parametrize(
    "models, says",
    [
        (["models/one"], "it lacks models/two"),
        (["models/one", "models/two", "models/three"], "it also merges models/three"),
    ],
    ids=["fewer", "more"],
)
def test_recipes_of_other_models_are_refused(
    workspace, isolated_score_cache, models, says
):
    twin(workspace / "models" / "two", workspace / "models" / "three")
    write_recipe(
        workspace / "other.yml", Path("models/base"), [Path(m) for m in models]
    )
    _refused(
        workspace,
        isolated_score_cache,
        _with_texts("tensor.yml", "other.yml"),
        f"other.yml: merges other models than tensor.yml ({says}); "
        "compare recipes of the same models",
    )


def test_one_folder_under_another_spelling_is_the_same_model(workspace, monkeypatch):
    """Not refused: `./models/one` is `models/one`. (Checked by reaching the text
    check, which comes after the models are compared.)"""
    write_recipe(
        workspace / "spelt.yml",
        Path("./models/base"),
        [Path("models/../models/one"), Path("models/two")],
    )
    (workspace / "empty.txt").write_text("")
    done = CliRunner().invoke(
        main, ["compare", "tensor.yml", "spelt.yml", "-t", "empty.txt"]
    )
    assert "empty.txt: empty" in done.stderr


@pytest.mark.parametrize(
    "text, content, says",
    [
        ("empty.txt", "", "empty.txt: empty; give a text to score"),
        ("blank.txt", " \n\n", "blank.txt: empty; give a text to score"),
        ("one.txt", "a", "one.txt: fewer than two tokens for the tokenizer of"),
    ],
)
def test_a_text_that_cannot_be_scored_is_refused(
    workspace, isolated_score_cache, text, content, says
):
    (workspace / text).write_text(content)
    _refused(workspace, isolated_score_cache, ["tensor.yml", "-t", text], says)


def test_a_missing_text_is_refused(workspace, isolated_score_cache):
    _refused(
        workspace,
        isolated_score_cache,
        ["tensor.yml", "-t", "nowhere.txt"],
        "nowhere.txt: cannot read text: No such file or directory",
    )


def test_two_texts_of_one_name_are_refused(workspace, isolated_score_cache):
    (workspace / "more").mkdir()
    (workspace / "more" / "sea.txt").write_text("The boat sailed at dawn.")
    _refused(
        workspace,
        isolated_score_cache,
        ["tensor.yml", "-t", "sea.txt", "-t", "more/sea.txt"],
        "more/sea.txt: another text has the name sea (sea.txt)",
    )


@pytest.mark.parametrize(
    "out, says",
    [
        ("models/base", "-o models/base: is input model"),
        ("models", "-o models: holds input model"),
        (".", "-o .: is the current folder or holds it"),
        ("notes", "-o notes: exists and is not a merge's output (it holds todo.txt)"),
    ],
)
def test_a_dir_that_is_an_input_or_not_ours_is_refused(
    workspace, isolated_score_cache, out, says
):
    (workspace / "notes").mkdir()
    (workspace / "notes" / "todo.txt").write_text("mine")
    _refused(
        workspace, isolated_score_cache, _with_texts("tensor.yml", "-o", out), says
    )


def test_linear_with_one_model_is_refused_by_the_recipe_check(
    workspace, isolated_score_cache
):
    """An NER recipe needs a fine-tune besides its base, so `--linear` always
    averages two models or more: a one-model recipe is refused as a recipe."""
    write_recipe(workspace / "alone.yml", Path("models/base"), [Path("models/base")])
    _refused(
        workspace,
        isolated_score_cache,
        _with_texts("alone.yml", "--linear"),
        "alone.yml: models: models must list at least one fine-tuned model",
    )


@pytest.mark.parametrize(
    "recipes, says",
    [
        (
            ["tensor.yml", "copy/tensor.yml"],
            "copy/tensor.yml: its merge would go to DIR/tensor, as tensor.yml's would",
        ),
        (
            ["linear.yml", "--linear"],
            "linear.yml: its merge would go to DIR/linear, as --linear's would",
        ),
    ],
)
def test_two_merges_into_one_folder_are_refused(
    workspace, isolated_score_cache, recipes, says
):
    (workspace / "copy").mkdir()
    shutil.copy(workspace / "tensor.yml", workspace / "copy" / "tensor.yml")
    shutil.copy(workspace / "tensor.yml", workspace / "linear.yml")
    _refused(workspace, isolated_score_cache, _with_texts(*recipes), says)


def test_a_bad_recipe_is_refused_naming_its_file(workspace, isolated_score_cache):
    (workspace / "typo.yml").write_text(
        (workspace / "tensor.yml").read_text() + "parameters:\n  granularity: row\n"
    )
    _refused(
        workspace,
        isolated_score_cache,
        _with_texts("tensor.yml", "typo.yml"),
        "typo.yml: parameters.granularity:",
    )
