"""Helpers shared by the tests: pico trios, recipes, merges, and independent
reference implementations to check the package against."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from mergekit.architecture import arch_info_for_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ner_merge.plan.source_map import Follows, ModelEntry, SourceMap, TensorChoice
from tests import pico

# Planted winners: model 1's layer-0 q_proj is rank 1 (NER 0, must lose);
# model 2's layer-1 up_proj is orthogonal (NER 1, must win).
RANK1_TENSOR = "model.layers.0.self_attn.q_proj.weight"
FLAT_TENSOR = "model.layers.1.mlp.up_proj.weight"


def build_trio(
    root: Path, family: str, tied: bool = False, **overrides
) -> dict[str, Path]:
    base = pico.base_model(family, seed=0, tied=tied, **overrides)
    one = pico.fine_tune(base, seed=1, plant={RANK1_TENSOR: "rank1"})
    two = pico.fine_tune(base, seed=2, plant={FLAT_TENSOR: "flat"})
    return {
        name: pico.save_model(model, root / name)
        for name, model in (("base", base), ("one", one), ("two", two))
    }


# Every family the method is tested on: (family, tied embeddings).
FAMILY_CASES = [
    ("qwen2", False),
    ("qwen2", True),
    ("llama", False),
    ("mistral", False),
    ("gemma2", False),
    ("phi3", False),  # fused qkv_proj and gate_up_proj
]


def write_recipe(
    path: Path, base: Path, models: list[Path], dtype: str = "bfloat16", **parameters
) -> Path:
    recipe = {
        "merge_method": "ner",
        "base_model": str(base),
        "models": [{"model": str(m)} for m in models],
        "dtype": dtype,
    }
    if parameters:
        recipe["parameters"] = parameters
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_merge(recipe_path: Path, out: Path, **options):
    """Merge in-process through mergekit's own run_merge (wrapped by the hook)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    text = recipe_path.read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    settings = dict(quiet=True, copy_tokenizer=True)
    settings.update(options)
    mergekit_run_merge(config, str(out), MergeOptions(**settings), config_source=text)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, relative path to bytes: what a run left."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder: its safetensors files, or where it has
    none, its pytorch_model*.bin files (mergekit's preference)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    if not tensors:
        for file in sorted(folder.glob("pytorch_model*.bin")):
            tensors.update(torch.load(file, weights_only=True))
    return tensors


def reference_ner(matrix: torch.Tensor) -> float:
    """The specification, written independently in numpy float64."""
    values = np.linalg.svd(matrix.double().numpy(), compute_uv=False)
    values = values[values > 1e-12]
    if len(values) <= 1:
        return 0.0
    p = values / values.sum()
    return float(-(p * np.log2(p)).sum() / np.log2(len(values)))


# How far the package's exact score may lie from `reference_ner` (two float64
# computations by different routes).
REFERENCE_TOLERANCE = 1e-9


def assert_scores_near_reference(choice, expected: list[float], names: list[str]):
    """Each model's score in a map equals the reference within its own bound: its
    recorded bound for a float32 score, REFERENCE_TOLERANCE for an exact one."""
    for name, reference in zip(names, expected):
        allowed = choice.bounds.get(name, 0.0) + REFERENCE_TOLERANCE
        assert abs(choice.scores[name] - reference) <= allowed, (name, choice)


def brute_force_winners(models: list[Path]) -> dict[str, int]:
    """For every 2-D float tensor: index of the highest-NER model, first on ties."""
    loaded = [load_tensors(m) for m in models]
    winners = {}
    for name, tensor in loaded[0].items():
        if tensor.ndim == 2 and tensor.is_floating_point():
            scores = [reference_ner(tensors[name]) for tensors in loaded]
            winners[name] = scores.index(max(scores))
    return winners


def eigensolves(monkeypatch) -> list[torch.dtype]:
    """The dtype of every eigensolve from now on: one per score computed, in
    either precision (check_device's 2 x 2 probe aside)."""
    solved = []
    real = torch.linalg.eigvalsh

    def counted(gram, *args, **kwargs):
        if gram.shape[0] > 2:
            solved.append(gram.dtype)
        return real(gram, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counted)
    return solved


def reference_strided_perplexity(model, tokens: torch.Tensor, window: int) -> float:
    """The strided evaluation of Hugging Face's perplexity guide, written here
    from transformers' own loss: windows advance by half a window, and labels
    of tokens an earlier window scored are masked (-100)."""
    nll, count, scored_to = 0.0, 0, 0
    for begin in range(0, len(tokens), window // 2):
        end = min(begin + window, len(tokens))
        ids = tokens[begin:end][None]
        labels = ids.clone()
        labels[:, : scored_to - begin] = -100
        predicted = int((labels[:, 1:] != -100).sum())  # the first is never
        loss = model(input_ids=ids, labels=labels).loss  # mean over `predicted`
        nll += loss.double().item() * predicted
        count += predicted
        scored_to = end
        if end == len(tokens):
            break
    return math.exp(nll / count)


BIT_VIEWS = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def reference_stabilize(base: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """NERD's stabilize, written independently: base values where |base| >= |chosen|
    and |base| < the lower median of |chosen|."""
    base_abs, chosen_abs = base.double().abs(), chosen.double().abs()
    ordered = sorted(chosen_abs.flatten().tolist())
    median = ordered[(len(ordered) - 1) // 2]
    return torch.where((base_abs >= chosen_abs) & (base_abs < median), base, chosen)


def token_axes(folder: Path) -> dict[str, int]:
    """Output tensor name -> token axis, for the tensors that mergekit's
    architecture of the folder's config marks as token-indexed (embeddings,
    lm_head: WeightInfo.vocabulary_axis), the only ones a tokenizer option
    re-indexes. Without a known architecture, none."""
    config = transformers.AutoConfig.from_pretrained(folder)
    architecture = arch_info_for_config(config)
    if architecture is None:
        return {}
    return {
        weight.name: weight.vocabulary_axis
        for weight in architecture.all_weights(config)
        if weight.vocabulary_axis is not None
    }


def assert_bit_identical_to_sources(out: Path, dtype=torch.bfloat16):
    """Every output tensor equals, bit for bit, its source's tensor in the map.

    A stabilized tensor must equal the independent stabilize of base and source.
    A token-indexed tensor (see token_axes) with fewer tokens than its source (a
    fine-tune's added tokens, dropped by `tokenizer: {source: base}`) must equal
    its first rows along the token axis; any other tensor must equal all of it.
    """
    source_map = json.loads((out / "ner_source_map.json").read_text())
    paths = {m["name"]: Path(m["path"]) for m in source_map["models"]}
    base = next(m["name"] for m in source_map["models"] if m["role"] == "base")
    output = load_tensors(out)
    sources = {name: load_tensors(path) for name, path in paths.items()}
    assert set(output) == set(source_map["tensors"])
    axes = token_axes(out)
    for name, tensor in output.items():
        choice = source_map["tensors"][name]
        expected = sources[choice["source"]][name]
        if expected.is_floating_point():  # integer buffers keep their dtype
            expected = expected.to(dtype)
        if choice.get("stabilized") is not None:
            expected = reference_stabilize(sources[base][name].to(dtype), expected)
        axis = axes.get(name)
        if axis is not None and tensor.shape[axis] < expected.shape[axis]:
            expected = expected.narrow(axis, 0, tensor.shape[axis])
        assert tensor.shape == expected.shape, name
        assert tensor.dtype == expected.dtype, name
        bits = BIT_VIEWS.get(tensor.dtype, tensor.dtype)  # NaN-safe, -0.0 != 0.0
        assert torch.equal(tensor.view(bits), expected.view(bits)), name
    return source_map


def twin(model: Path, target: Path) -> Path:
    """A copy of a model that scores exactly like it, yet is not the same model
    (one model may not be given twice): its final norm is doubled, which leaves
    every score as it was (NER and NERD's min-max scaling are scale-invariant,
    and doubling is exact)."""
    shutil.copytree(model, target)
    tensors = load_file(target / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def small_source_map() -> SourceMap:
    """A valid two-model source map made by hand, without torch or any model."""
    models = tuple(
        ModelEntry(name=n, path=f"/m/{n}", revision=None, fingerprint="0" * 64, role=r)
        for n, r in (("base", "base"), ("tuned", "fine-tuned"))
    )
    matrix = "model.layers.0.self_attn.q_proj.weight"
    tensors = {
        matrix: TensorChoice(
            source="tuned",
            rule="highest-ner",
            layer=0,
            shape=(4, 2),
            scores={"base": 0.5, "tuned": 0.75},
            bounds={"tuned": 2e-6},
        ),
        "model.layers.0.self_attn.q_proj.bias": TensorChoice(
            source="tuned",
            rule="follows",
            layer=0,
            shape=(4,),
            follows=Follows(kind="tensor", name=matrix),
        ),
        "model.norm.weight": TensorChoice(
            source="base",
            rule="follows",
            layer=None,
            shape=(2,),
            follows=Follows(kind="non-layer"),
        ),
    }
    return SourceMap(models=models, options={}, tensors=tensors)
