"""Fine-tunes with added tokens: a clear error, or mergekit's tokenizer options."""

import pytest
import torch
import transformers
import yaml

from ner_merge.errors import ModelError
from ner_merge.plan.planner import plan
from ner_merge.recipe.recipe import Recipe
from tests import pico
from tests.helpers import (
    assert_bit_identical_to_sources,
    load_tensors,
    run_merge,
    write_recipe,
)

ADDED_TOKENS = ["<tool_call>", "<think>"]


@pytest.fixture(scope="session")
def wider(tmp_path_factory, trios):
    """A Llama fine-tune of the trio's base with two added tokens."""
    base_folder = trios("llama")["base"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_folder)
    tokenizer.add_tokens(ADDED_TOKENS)
    model = pico.fine_tune(
        transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype="float32"),
        seed=5,
    )
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    folder = tmp_path_factory.mktemp("wider")
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_differing_vocabularies_name_tensor_shapes_and_option(tmp_path, trios, wider):
    trio = trios("llama")
    recipe = write_recipe(tmp_path / "r.yml", trio["base"], [trio["one"], wider])
    with pytest.raises(ModelError) as error:
        plan(Recipe.from_file(recipe), quiet=True)
    message = str(error.value)
    size = len(pico.tokenizer())
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        assert tensor in message
    assert f"[{size}, 32]" in message and f"[{size + 2}, 32]" in message
    assert "tokenizer: {source: base}" in message


def test_tokenizer_source_base_keeps_the_base_vocabulary(tmp_path, trios, wider):
    trio = trios("llama")
    recipe = write_recipe(tmp_path / "r.yml", trio["base"], [trio["one"], wider])
    document = yaml.safe_load(recipe.read_text())
    document["tokenizer"] = {"source": "base"}
    recipe.write_text(yaml.safe_dump(document))
    out = tmp_path / "out"
    run_merge(recipe, out)
    source_map = assert_bit_identical_to_sources(out)  # vocab tensors: first rows
    size = len(pico.tokenizer())
    merged = load_tensors(out)
    assert merged["model.embed_tokens.weight"].shape == (size, 32)
    assert source_map["tensors"]["lm_head.weight"]["shape"] == [size, 32]
    assert transformers.AutoConfig.from_pretrained(out).vocab_size == size
    wide_name = source_map["models"][2]["name"]
    assert wide_name in {c["source"] for c in source_map["tensors"].values()}
