"""The demo trio, built here and offline: a tiny Qwen2 base and two fine-tunes.

A byte-level BPE tokenizer is trained on the bundled texts; the base model learns
everyday prose (`general.txt`), then two copies of it are fine-tuned on different
domains (`sea.txt`, `kitchen.txt`). Real training, not noise, gives the matrices
real spectra for NER to tell apart, and gives `ner-merge eval` something to show.
Everything runs on two CPU cores in about a minute.

    ner-merge demo demo/models     # writes base/, sea/, kitchen/
"""

import logging
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

LOG = logging.getLogger(__name__)

TEXTS = Path(__file__).parent / "texts"
TRAINING_TEXTS = {"base": "general.txt", "sea": "sea.txt", "kitchen": "kitchen.txt"}
HELD_OUT_TEXTS = ("heldout_general.txt", "heldout_sea.txt", "heldout_kitchen.txt")

VOCAB_SIZE = 384  # enough merges for common words of three small texts
BLOCK_SIZE = 64  # tokens per training sequence
BATCH_SIZE = 16
BASE_STEPS = 500
FINE_TUNE_STEPS = 250
LEARNING_RATE = 3e-3
SEED = 1234


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer over all training texts (Qwen2's tokenizer kind)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = [str(TEXTS / name) for name in TRAINING_TEXTS.values()]
    tokenizer.train(files, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=4 * BLOCK_SIZE,
    )


def tiny_qwen2_config(vocab_size: int) -> Qwen2Config:
    """Qwen2's real architecture (GQA, q/k/v biases, SwiGLU), shrunk."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * BLOCK_SIZE,
        tie_word_embeddings=False,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )


def train(
    model: Qwen2ForCausalLM, tokens: torch.Tensor, steps: int, seed: int
) -> float:
    """Next-token training on random windows of `tokens`; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LEARNING_RATE, weight_decay=0.0
    )
    model.train()
    loss = torch.tensor(math.nan)
    for step in range(steps):
        starts = torch.randint(
            len(tokens) - BLOCK_SIZE, (BATCH_SIZE,), generator=generator
        )
        batch = torch.stack([tokens[s : s + BLOCK_SIZE] for s in starts])  # (B, T)
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = LEARNING_RATE * (
                0.55 + 0.45 * math.cos(math.pi * step / steps)
            )
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def encode(tokenizer: PreTrainedTokenizerFast, file_name: str) -> torch.Tensor:
    text = (TEXTS / file_name).read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def build(out_dir: Path) -> dict[str, Path]:
    """Train and save the trio in bfloat16 (as real checkpoints ship); returns paths."""
    torch.manual_seed(SEED)
    tokenizer = train_tokenizer()
    base = Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer)))
    paths = {}
    for name, file_name in TRAINING_TEXTS.items():
        model = base if name == "base" else Qwen2ForCausalLM(base.config)
        if name != "base":
            model.load_state_dict(base.state_dict())
        steps = BASE_STEPS if name == "base" else FINE_TUNE_STEPS
        loss = train(model, encode(tokenizer, file_name), steps, seed=SEED + len(paths))
        LOG.info(
            "%s: trained %d steps on %s, final loss %.3f", name, steps, file_name, loss
        )
        paths[name] = out_dir / name
        model.to(torch.bfloat16).save_pretrained(paths[name], safe_serialization=True)
        model.to(torch.float32)
        tokenizer.save_pretrained(paths[name])
    return paths


def generate(model_dir: str | Path, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt` by a saved model (deterministic)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)
