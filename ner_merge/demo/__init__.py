"""The demo trio, built here and offline: a tiny Qwen2 base and two fine-tunes
that behave like real ones.

A byte-level BPE tokenizer is trained on the bundled texts. The base learns
everyday prose (`general.txt`) until its loss on a validation slice of that text
stops improving, as a real pre-training run is judged on held-back data; the
held-out texts that `ner-merge eval` scores are never seen, not even for
stopping. Each fine-tune is then a brief, low-rate adaptation of that base to one
domain (`sea.txt`, `kitchen.txt`), as supervised fine-tuning is: a few epochs at a
small fraction of the pre-training rate, moving the weights by under a percent.
Real training, not noise, gives the matrices real spectra for NER to tell apart.
Everything runs on one CPU thread in about 20 seconds.

    ner-merge demo demo/models     # writes base/, sea/, kitchen/

Why these settings (chosen from how real models are trained, before any merge
was scored):
- A real base is trained until held-back loss stops falling; with 13k tokens of
  prose, this 230k-parameter model gets there in a few hundred steps and then
  starts to memorise, so training stops at the best validation loss, not at a
  fixed step count.
- Real supervised fine-tuning runs 1 to 3 epochs at about 1/15 to 1/60 of the
  pre-training peak rate (e.g. 2e-5 after 3e-4), with a short warm-up and a
  decay to zero, and moves a model's weights by roughly 1e-3 to 1e-2 of their
  norm. Here: 2 epochs at 1/30 of the base's rate, which moves each fine-tune by
  under 1e-2 (the log reports the measured change).
"""

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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

from ner_merge.host.output import give_creation_mode

TEXTS = Path(__file__).parent / "texts"
TRAINING_TEXTS = {"base": "general.txt", "sea": "sea.txt", "kitchen": "kitchen.txt"}
HELD_OUT_TEXTS = ("heldout_general.txt", "heldout_sea.txt", "heldout_kitchen.txt")

VOCAB_SIZE = 384  # enough merges for common words of three small texts
BLOCK_SIZE = 64  # tokens per training sequence
SEED = 1234
# One thread: this model is too small to gain from more, and floating-point sums
# then run in one order whatever the machine's core count, so the trio, and
# the demo's figures, are the same on any machine with the same torch build.
TRAINING_THREADS = 1

# Pre-training the base. The rate is high for a tiny model (7B models peak near
# 3e-4); the warm-up keeps Adam's first, noisy steps small.
PRETRAIN_BATCH = 16  # sequences per step
PRETRAIN_LEARNING_RATE = 3e-3
PRETRAIN_WARMUP = 50  # steps
PRETRAIN_WEIGHT_DECAY = 0.1  # the usual pre-training value
VALIDATION_SHARE = 0.1  # the end of general.txt, never trained on
EVALUATE_EVERY = 25  # steps between validation losses
PATIENCE = 6  # evaluations without a new best before stopping
MAX_PRETRAIN_STEPS = 3000  # a bound only: early stopping ends it long before

# Fine-tuning (see the module docstring for why).
FINE_TUNE_BATCH = 4  # sequences per step: fine-tunes take smaller batches
FINE_TUNE_LEARNING_RATE = PRETRAIN_LEARNING_RATE / 30
FINE_TUNE_EPOCHS = 2
FINE_TUNE_WARMUP_SHARE = 0.1  # of its steps, then linear decay to zero

ADAM_BETAS = (0.9, 0.95)  # the usual choice for language models


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


def encode(tokenizer: PreTrainedTokenizerFast, file_name: str) -> torch.Tensor:
    """A bundled text as one sequence of token ids (longer than the model's
    context: training cuts it into windows, so transformers' warning is moot)."""
    text = (TEXTS / file_name).read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def windows(tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` cut into consecutive, non-overlapping sequences: (N, BLOCK_SIZE)."""
    count = len(tokens) // BLOCK_SIZE
    return tokens[: count * BLOCK_SIZE].view(count, BLOCK_SIZE)


def mean_loss(model: Qwen2ForCausalLM, tokens: torch.Tensor) -> float:
    """The model's mean next-token loss over `tokens`, window by window."""
    training = model.training
    model.eval()
    with torch.inference_mode():
        batch = windows(tokens)
        loss = model(input_ids=batch, labels=batch).loss.item()
    model.train(training)
    return loss


def _step(model, optimizer, batch: torch.Tensor, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@dataclass(frozen=True)
class Pretraining:
    steps: int  # run in all
    best_step: int  # whose weights were kept
    validation_loss: float  # at best_step


def pretrain(model: Qwen2ForCausalLM, tokens: torch.Tensor, seed: int) -> Pretraining:
    """Train on the first part of `tokens` until the loss on the rest (the last
    VALIDATION_SHARE) has not improved for PATIENCE evaluations; the model is
    left with the weights of its best evaluation."""
    cut = round(len(tokens) * (1 - VALIDATION_SHARE))
    train, validation = tokens[:cut], tokens[cut:]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), weight_decay=PRETRAIN_WEIGHT_DECAY, betas=ADAM_BETAS
    )
    model.train()
    best = (math.inf, 0, copy.deepcopy(model.state_dict()))
    step = 0
    while step < MAX_PRETRAIN_STEPS and step - best[1] < PATIENCE * EVALUATE_EVERY:
        step += 1
        starts = torch.randint(
            len(train) - BLOCK_SIZE, (PRETRAIN_BATCH,), generator=generator
        )
        batch = torch.stack([train[s : s + BLOCK_SIZE] for s in starts])  # (B, T)
        rate = PRETRAIN_LEARNING_RATE * min(1.0, step / PRETRAIN_WARMUP)
        _step(model, optimizer, batch, rate)
        if step % EVALUATE_EVERY == 0:
            loss = mean_loss(model, validation)
            if loss < best[0]:
                best = (loss, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return Pretraining(steps=step, best_step=best[1], validation_loss=best[0])


def _fine_tune_batches(tokens: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    """FINE_TUNE_EPOCHS passes over the text's windows, each in a new order."""
    generator = torch.Generator().manual_seed(seed)
    sequences = windows(tokens)
    for _ in range(FINE_TUNE_EPOCHS):
        order = torch.randperm(len(sequences), generator=generator)
        for first in range(0, len(order), FINE_TUNE_BATCH):
            yield sequences[order[first : first + FINE_TUNE_BATCH]]


def fine_tune(model: Qwen2ForCausalLM, tokens: torch.Tensor, seed: int) -> int:
    """Adapt `model` to `tokens` as supervised fine-tuning does; returns the steps.

    Linear warm-up over the first FINE_TUNE_WARMUP_SHARE of the steps, then a
    linear decay to zero; no weight decay.
    """
    batches = list(_fine_tune_batches(tokens, seed))
    warmup = max(1, round(FINE_TUNE_WARMUP_SHARE * len(batches)))
    optimizer = torch.optim.AdamW(
        model.parameters(), weight_decay=0.0, betas=ADAM_BETAS
    )
    model.train()
    for step, batch in enumerate(batches, 1):
        if step <= warmup:
            share = step / warmup
        else:
            share = (len(batches) - step) / (len(batches) - warmup)
        _step(model, optimizer, batch, FINE_TUNE_LEARNING_RATE * share)
    model.eval()
    return len(batches)


def relative_change(
    tuned: Qwen2ForCausalLM, base: Qwen2ForCausalLM
) -> tuple[float, float, float]:
    """||W_ft - W_base|| / ||W_base|| over all weights together (Frobenius norms),
    and its smallest and largest value over the single matrices."""
    tuned_weights, base_weights = tuned.state_dict(), base.state_dict()
    delta = total = 0.0
    per_matrix = []
    for name, weight in base_weights.items():
        difference = (tuned_weights[name] - weight).double().norm().item()
        norm = weight.double().norm().item()
        delta, total = delta + difference**2, total + norm**2
        if weight.dim() == 2:
            per_matrix.append(difference / norm)
    return math.sqrt(delta / total), min(per_matrix), max(per_matrix)


def build(out_dir: Path, log: Callable[[str], None]) -> dict[str, Path]:
    """Train and save the trio in float32; returns paths, and logs a line per model.

    float32, not the bfloat16 real checkpoints ship in: a change of under 1% of
    a weight is below bfloat16's resolution (8 bits of mantissa) for most single
    weights, so rounding would erase much of each fine-tune.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        return _build(out_dir, log)
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path, log: Callable[[str], None]) -> dict[str, Path]:
    torch.manual_seed(SEED)
    tokenizer = train_tokenizer()
    base = Qwen2ForCausalLM(tiny_qwen2_config(len(tokenizer)))
    text = TRAINING_TEXTS["base"]
    result = pretrain(base, encode(tokenizer, text), seed=SEED)
    log(
        f"base: {result.steps} steps on {text} (all but its last "
        f"{VALIDATION_SHARE:.0%}); kept step {result.best_step}, the lowest "
        f"validation loss ({result.validation_loss:.3f} on that last part)"
    )
    trained = {"base": base}
    for number, name in enumerate(("sea", "kitchen"), 1):
        model = Qwen2ForCausalLM(base.config)
        model.load_state_dict(base.state_dict())
        tokens = encode(tokenizer, TRAINING_TEXTS[name])
        before = mean_loss(model, tokens)
        steps = fine_tune(model, tokens, seed=SEED + number)
        change, smallest, largest = relative_change(model, base)
        log(
            f"{name}: {FINE_TUNE_EPOCHS} epochs ({steps} steps) on "
            f"{TRAINING_TEXTS[name]} at {FINE_TUNE_LEARNING_RATE:.0e}, loss "
            f"{before:.3f} -> {mean_loss(model, tokens):.3f}; "
            f"||W_ft - W_base|| / ||W_base|| = {change:.1e} "
            f"(per matrix {smallest:.1e} to {largest:.1e})"
        )
        trained[name] = model
    paths = {}
    for name, model in trained.items():
        paths[name] = out_dir / name
        model.save_pretrained(paths[name], safe_serialization=True)
        tokenizer.save_pretrained(paths[name])
        give_creation_mode(paths[name])  # safetensors writes 0600
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
