"""Perplexity of model folders on text files: did the merge help?

Each model is scored with its own tokenizer, one model in memory at a time. A
text longer than the model's context is scored in overlapping windows: each
window of `window` tokens advances by half a window and scores only the tokens
the previous one did not, so every token after the first is predicted exactly
once, with at least half a window of context (the strided evaluation of
Hugging Face's perplexity guide). Perplexity is exp of the mean negative
log-likelihood over all those tokens.

Deterministic: no sampling, no dropout (eval mode), a fixed window schedule; on
CPU the forward pass runs in float32. On CUDA, models run in bfloat16 so that a
7B model fits comfortably, and perplexities differ slightly from CPU's.
"""

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ner_merge.demo import HELD_OUT_TEXTS, TEXTS
from ner_merge.errors import EvaluationError, torch_failure
from ner_merge.evaluate.words import plural
from ner_merge.models.folders import model_folder_problem, tokenizer_problem

LOG = logging.getLogger(__name__)

MAX_WINDOW = 2048  # tokens; caps long-context models so a window fits in memory
# The demo's held-out texts: prose of each training domain that no model saw.
DEMO_TEXTS = tuple(TEXTS / name for name in HELD_OUT_TEXTS)


@dataclass(frozen=True)
class PerplexityTable:
    """Perplexity of every model (rows) on every text (columns)."""

    models: tuple[str, ...]
    texts: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]  # values[model][text]
    device: str

    def best(self) -> list[float]:
        """The lowest perplexity on each text."""
        return [min(column) for column in zip(*self.values)]

    def render(self) -> str:
        """An aligned text table; `*` marks the lowest perplexity of each text."""
        best = self.best()
        header = ["model", *self.texts]
        rows = [
            [model, *(f"{v:.2f}{'*' if v == b else ' '}" for v, b in zip(row, best))]
            for model, row in zip(self.models, self.values)
        ]
        widths = [
            max(len(line[i]) for line in [header, *rows]) for i in range(len(header))
        ]
        lines = [
            f"Perplexity on {plural(len(self.texts), 'text')}, lower is better; "
            f"* = best per text ({self.device})"
        ]
        for line in [header, *rows]:
            cells = [line[0].ljust(widths[0])]
            cells += [text.rjust(width) for text, width in zip(line[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)

    def markdown(self) -> str:
        """The same table in Markdown, the lowest perplexity of each text in bold."""
        best = self.best()
        lines = [
            "| model | " + " | ".join(self.texts) + " |",
            "|---|" + "---:|" * len(self.texts),
        ]
        for model, row in zip(self.models, self.values):
            cells = [
                f"**{v:.2f}**" if v == b else f"{v:.2f}" for v, b in zip(row, best)
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def perplexity(model: PreTrainedModel, tokens: torch.Tensor, window: int) -> float:
    """exp(mean NLL) of `tokens` (1-D ids, at least two) under `model`, in windows
    of `window` (at least 2) tokens that advance by half a window."""
    stride = window // 2
    total, count = 0.0, 0
    scored_to = 1  # tokens before this index are scored (the first never is)
    begin = 0
    while True:
        end = min(begin + window, len(tokens))
        ids = tokens[begin:end].to(model.device)
        logits = model(input_ids=ids[None]).logits[0].float()  # (T, V)
        first = scored_to - begin  # first position in the window not yet scored
        log_probs = torch.log_softmax(logits[first - 1 : -1], dim=-1)  # (T-first, V)
        targets = ids[first:]
        total -= log_probs.gather(1, targets[:, None]).double().sum().item()
        count += len(targets)
        scored_to = end
        if end == len(tokens):
            return math.exp(total / count)
        begin += stride


def check_model_folders(models: Sequence[str | Path]) -> None:
    """Refuse, before loading anything, a folder that holds no model or tokenizer.

    Loading models one by one would fail only when the bad folder's turn comes,
    with transformers' message (about sentencepiece or a repo id, say).
    """
    for folder in models:
        problem = model_folder_problem(folder) or tokenizer_problem(folder)
        if problem:
            raise EvaluationError(
                f"{folder}: cannot load a causal language model and its "
                f"tokenizer: {problem}"
            )


def read_texts(
    texts: Sequence[str | Path], folders: Sequence[str | Path]
) -> dict[str, str]:
    """Each text file's content, by path, once every one is known to be scorable:
    readable, not empty, and at least two tokens long for the tokenizer of each
    folder (perplexity predicts each token from the ones before it, so a text
    needs two). Checked before any model is loaded, so a bad text fails at once
    rather than after the models before it were scored.
    """
    contents: dict[str, str] = {}
    named: dict[str, str] = {}  # file name without suffix: text
    for text in texts:
        name = Path(text).stem
        if name in named:
            raise EvaluationError(
                f"{text}: another text has the name {name} ({named[name]}); "
                "the table names each text by its file name, so give each once, "
                "under names of their own"
            )
        named[name] = str(text)
        try:
            contents[str(text)] = Path(text).read_text(encoding="utf-8")
        except OSError as error:
            raise EvaluationError(
                f"{text}: cannot read text: {error.strerror}"
            ) from None
        except UnicodeDecodeError as error:
            raise EvaluationError(f"{text}: not UTF-8 text ({error})") from None
        if not contents[str(text)].strip():
            raise EvaluationError(f"{text}: empty; give a text to score")
    for folder in dict.fromkeys(str(folder) for folder in folders):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        for text, content in contents.items():
            if len(_token_ids(tokenizer, content)) < 2:
                raise EvaluationError(
                    f"{text}: fewer than two tokens for the tokenizer of {folder}; "
                    "perplexity needs at least two (the first is never predicted)"
                )
    return contents


def _token_ids(tokenizer, content: str) -> torch.Tensor:
    """A whole text as ids (the model scores it in windows: no length warning)."""
    return torch.tensor(
        tokenizer(content, verbose=False)["input_ids"], dtype=torch.long
    )


def evaluate(
    models: Sequence[str | Path],
    texts: Sequence[str | Path] = DEMO_TEXTS,
    device: str | None = None,
    window: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> PerplexityTable:
    """Perplexity of each model folder on each text file.

    device: a torch device (`cpu`, `cuda:1`...); by default CUDA when available.
    window: tokens per window, at most each model's `max_position_embeddings`;
    by default that, up to MAX_WINDOW. progress: called with one line as each
    model starts, since a 7B model takes minutes.
    """
    check_model_folders(models)
    device = evaluation_device(device)
    contents = read_texts(texts, models)
    on_cpu = torch.device(device).type == "cpu"
    dtype = torch.float32 if on_cpu else torch.bfloat16
    values = []
    for number, folder in enumerate(models, 1):
        if progress:
            progress(f"[{number}/{len(models)}] {folder}")
        model, tokenizer = _load(folder, device, dtype)
        limit = model.config.max_position_embeddings
        if window is not None and not 2 <= window <= limit:
            raise EvaluationError(
                f"{folder}: window {window} is not between 2 and its "
                f"max_position_embeddings {limit}"
            )
        size = window or min(limit, MAX_WINDOW)
        row = []
        with torch.inference_mode():
            for text, content in contents.items():
                row.append(perplexity(model, _token_ids(tokenizer, content), size))
                LOG.info("%s on %s: perplexity %.3f", folder, text, row[-1])
        values.append(tuple(row))
        del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return PerplexityTable(
        models=tuple(str(m) for m in models),
        texts=tuple(Path(t).stem for t in texts),
        values=tuple(values),
        device=device,
    )


def evaluation_device(device: str | None) -> str:
    """The torch device asked for, tried with a small tensor; by default (or
    `auto`, as mergekit's) CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.ones(2, device=device).sum().item()
    except Exception as error:  # torch raises many kinds for a bad device
        raise EvaluationError(
            f"--device {device}: torch cannot run a model there "
            f"({torch_failure(error)})"
        ) from None
    return device


def _load(folder: str | Path, device: str, dtype: torch.dtype):
    """A model folder's causal LM (eval mode, on `device`) and its own tokenizer."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as error:
        raise EvaluationError(
            f"{folder}: cannot load a causal language model and its tokenizer: {error}"
        ) from None
    return model.to(device).eval(), tokenizer
