"""Pico checkpoints for tests: real architectures, 2 layers, 32 wide, built in ms.

A "fine-tune" is the base plus a seeded perturbation, with winners planted where
a test wants to know the answer: a rank-1 copy always loses, a copy with a flat
spectrum (orthogonal) wins.
"""

from pathlib import Path

import torch
import transformers

from ner_merge.demo import train_tokenizer

FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
}

# Noise scale for an all-zero tensor (a fresh bias), which has no size of its own.
ZERO_SPREAD = 0.02

_TOKENIZER = None


def tokenizer():
    """One real (trained) tokenizer shared by every pico model."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = train_tokenizer()
    return _TOKENIZER


def pico_config(family: str, tied: bool = False, **overrides):
    config_class, _ = FAMILIES[family]
    settings = dict(
        vocab_size=len(tokenizer()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    settings.update(overrides)
    return config_class(**settings)


def save_model(model, path: Path, dtype=torch.bfloat16) -> Path:
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer().save_pretrained(path)
    return path


def base_model(family: str, seed: int = 0, tied: bool = False, **overrides):
    torch.manual_seed(seed)
    _, model_class = FAMILIES[family]
    return model_class(pico_config(family, tied=tied, **overrides))


def fine_tune(base, seed: int, plant: dict[str, str] | None = None):
    """A copy of `base` perturbed per tensor with seeded noise of varied scale.

    Matrices and 1-D weights (norms, biases) alike, so that scores of norms
    (`compat: nerd` scores them) differ between models too.

    plant maps a tensor name to "rank1" (its NER becomes 0) or "flat" (an
    orthogonal matrix: NER 1, the maximum).
    """
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.5 * torch.rand((), generator=generator).item()
            noise = torch.randn(parameter.shape, generator=generator)
            spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
            if spread == 0.0:  # a constant (a norm's ones, a zero bias): its size
                spread = float(parameter.abs().mean()) or ZERO_SPREAD
            parameter.add_(scale * spread * noise)
            planted = (plant or {}).get(name)
            if planted == "rank1":
                u = torch.randn(parameter.shape[0], 1, generator=generator)
                v = torch.randn(1, parameter.shape[1], generator=generator)
                parameter.copy_(0.05 * u @ v)
            elif planted == "flat":
                q, _ = torch.linalg.qr(
                    torch.randn(
                        max(parameter.shape), min(parameter.shape), generator=generator
                    )
                )
                parameter.copy_(q if parameter.shape[0] >= parameter.shape[1] else q.T)
    return model
