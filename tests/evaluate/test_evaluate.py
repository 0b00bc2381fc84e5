"""`ner-merge eval`: perplexity tells a model's own domain from one it never saw."""

import math
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner

from ner_merge import demo
from ner_merge.cli import main
from ner_merge.evaluate.perplexity import evaluate, perplexity
from tests import pico
from tests.helpers import reference_strided_perplexity

CHARACTERS = 1500  # of each training text to score: a dozen windows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Pico matmuls gain nothing from threads, and on a busy machine more threads
    than free cores make every step several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def specialists(tmp_path_factory) -> dict[str, Path]:
    """Two pico Qwen2 models from one seeded start, each trained on its own text
    until its validation loss stops falling."""
    root = tmp_path_factory.mktemp("specialists")
    start = pico.base_model("qwen2").to(torch.float32)
    folders = {}
    for seed, domain in enumerate(("sea", "kitchen")):
        model = type(start)(start.config)
        model.load_state_dict(start.state_dict())
        tokens = demo.encode(pico.tokenizer(), demo.TRAINING_TEXTS[domain])
        demo.pretrain(model, tokens, seed=seed)
        folders[domain] = pico.save_model(model, root / domain, torch.float32)
    return folders


def test_a_model_scores_its_own_text_better(specialists, tmp_path):
    texts = []
    for domain in ("sea", "kitchen"):
        text = (demo.TEXTS / demo.TRAINING_TEXTS[domain]).read_text()
        texts.append(tmp_path / f"{domain}.txt")
        texts[-1].write_text(text[:CHARACTERS])
    table = evaluate([specialists["sea"], specialists["kitchen"]], texts, "cpu")
    (sea_on_sea, sea_on_kitchen), (kitchen_on_sea, kitchen_on_kitchen) = table.values
    assert sea_on_sea < kitchen_on_sea
    assert kitchen_on_kitchen < sea_on_kitchen
    assert table.texts == ("sea", "kitchen")
    # Consistency only: a model alone gets the values it gets beside another.
    assert evaluate([specialists["sea"]], texts, "cpu").values[0] == table.values[0]


def test_perplexity_is_transformers_own_loss_in_one_window_or_strided(specialists):
    model = transformers.AutoModelForCausalLM.from_pretrained(specialists["sea"])
    tokens = demo.encode(pico.tokenizer(), "heldout_sea.txt")[:100]
    with torch.inference_mode():
        loss = model(input_ids=tokens[None], labels=tokens[None]).loss.item()
        whole = perplexity(model, tokens, window=100)
        strided = perplexity(model, tokens, window=16)
        reference = reference_strided_perplexity(model, tokens, window=16)
    assert whole == pytest.approx(math.exp(loss), rel=1e-5)
    # Shorter context: a different value, that of the strided reference.
    assert strided != whole
    assert strided == pytest.approx(reference, rel=1e-5)


def test_eval_cli_prints_a_row_per_model_and_a_column_per_text(specialists, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("The cook stirred the pot while the boat rocked.")
    done = CliRunner().invoke(
        main,
        ["eval", str(specialists["sea"]), str(specialists["kitchen"]), "-t", str(short)]
        + ["--device", "cpu"],
    )
    assert done.exit_code == 0, done.output
    lines = done.stdout.splitlines()
    assert lines[1].split() == ["model", "short"]
    assert [line.split()[0] for line in lines[2:]] == [
        str(specialists["sea"]),
        str(specialists["kitchen"]),
    ]
    assert sum("*" in line for line in lines[2:]) == 1  # the best, marked


def test_eval_cli_defaults_to_the_demo_texts_and_reports_bad_input(
    specialists, tmp_path
):
    done = CliRunner().invoke(main, ["eval", str(specialists["sea"])])
    assert done.exit_code == 0, done.output
    header = done.stdout.splitlines()[1].split()
    assert header == ["model", "heldout_general", "heldout_sea", "heldout_kitchen"]

    not_a_model = CliRunner().invoke(main, ["eval", str(tmp_path)])
    assert not_a_model.exit_code == 1
    assert f"{tmp_path}: cannot load a causal language model" in not_a_model.output
    too_wide = CliRunner().invoke(
        main, ["eval", str(specialists["sea"]), "--window", "100000"]
    )
    assert too_wide.exit_code == 1 and "max_position_embeddings 128" in too_wide.output
