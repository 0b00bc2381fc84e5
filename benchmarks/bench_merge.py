"""Benchmark ner-merge end to end against the reference tool's pipeline.

A base and two fine-tunes with Qwen2.5-0.5B's shapes (random bf16 weights, built
once into a cache folder) are merged:

1. by ner-merge (plan + merge through mergekit's `run_merge`, empty score cache);
2. by a faithful re-implementation of the first public NER tool (NERD): whole
   models loaded in float32, float32 svdvals of every module weight as stored
   (after its min-max scaling), then the composite built module by module,
   reloading the entire source model for every module it swaps in;
3. by ner-merge again with models of half the layers (memory must not grow with
   the model);

then a first and a second (cached) plan are timed, the cost of hashing every
tensor (exact content identity) per GB, and the merge alone with a ready source
map against mergekit's `linear` merge of the same models. Every run
is a subprocess of its own that reports its wall time (after imports) and its
peak resident memory (VmHWM), so all figures come from one run of
this script on one machine.

    python benchmarks/bench_merge.py [--quick] [--cache DIR]
"""

import os

# On a shared CPU, OpenMP threads that spin while waiting make LAPACK calls 10-100x
# slower and their timings meaningless (measured here: eigvalsh of 256 x 256 took
# 0.6-1.6 s spinning, 0.01 s passive). Every side of every comparison runs with
# the same setting; it must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import math
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SCALE = {
    # Qwen2.5-0.5B's shapes (tied embeddings, as the real model).
    "full": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "quick": dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
}
MODEL_NAMES = ("base", "one", "two")
NERD_CUTOFF = 1e-12  # the reference tool's singular value cut-off
NERD_RANGE_FLOOR = 1e-10  # its min-max scaling's denominator floor


# ---- building the models -------------------------------------------------------


def build_trio(root: Path, layers: int, scale: dict, count: int = 3) -> list[Path]:
    """Base + `count - 1` fine-tunes (base plus noise of varied scale), bf16,
    built once."""
    import transformers
    from safetensors.torch import save_file

    settings = dict(scale, num_hidden_layers=layers, tie_word_embeddings=True)
    config = transformers.Qwen2Config(**settings, architectures=["Qwen2ForCausalLM"])
    folder = root / f"qwen2-{scale['hidden_size']}w-{layers}l"
    names = [*MODEL_NAMES, *(f"tuned-{seed}" for seed in range(3, count))][:count]
    paths = [folder / name for name in names]
    if all((p / "model.safetensors").exists() for p in paths):
        return paths
    generator = torch.Generator().manual_seed(0)
    base = random_base(config, generator)
    for seed, path in enumerate(paths):
        tensors = base
        if seed:
            generator.manual_seed(seed)
            tensors = {
                name: (
                    t.float()
                    + torch.rand((), generator=generator)
                    * 0.02
                    * torch.randn(t.shape, generator=generator)
                ).bfloat16()
                for name, t in base.items()
            }
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
        del tensors
        gc.collect()
    return paths


# ---- the runs (each in a child process) ------------------------------------------


def random_base(config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A tied Qwen2 model's tensors in bf16: Gaussian matrices (std 0.02), norms
    of ones."""
    import transformers

    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(config)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    shapes.pop("lm_head.weight")  # tied
    return {
        name: (torch.randn(shape, generator=generator) * 0.02).bfloat16()
        if len(shape) == 2
        else torch.ones(shape).bfloat16()
        for name, shape in shapes.items()
    }


def write_recipe(path: Path, models: list[Path], method: str, **parameters) -> Path:
    import yaml

    recipe = {
        "merge_method": method,
        "base_model": str(models[0]),
        "models": [{"model": str(m)} for m in models[1:]],
        "dtype": "bfloat16",
    }
    if method == "linear":
        recipe["models"] = [
            {"model": str(m), "parameters": {"weight": 1.0}} for m in models
        ]
        del recipe["base_model"]
    if parameters:
        recipe["parameters"] = parameters
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def mergekit_merge(recipe: Path, out: Path) -> None:
    """A merge through mergekit's own run_merge (the ner hook wraps it)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False)
    run_merge(config, str(out), options)


def nerd_score(weight: torch.Tensor) -> float:
    """The reference tool's score of one module weight (float32, as stored)."""
    try:
        w = weight.detach().float()
        if w.ndim == 1:
            w = w.unsqueeze(0)
        w = (w - w.min()) / max((w.max() - w.min()).item(), NERD_RANGE_FLOOR)
        w = w.bfloat16().float()
        if 1 in w.shape:
            values = w.abs().flatten()
        else:
            values = torch.linalg.svdvals(w)
        values = values[values > NERD_CUTOFF]
        if values.numel() <= 1:
            return 0.0
        p = values / values.sum()
        return float(-(p * p.log2()).sum() / math.log2(values.numel()))
    except Exception:  # the reference scores any failure as 0
        return 0.0


def reference_pipeline(models: list[Path], out: Path) -> None:
    """NERD's pipeline: whole-model loads, svdvals, reload per swapped module."""
    import transformers

    def load(path: Path) -> torch.nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32
        )

    scores: dict[str, list[float]] = {}
    for path in models:
        model = load(path)
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                scores.setdefault(name, []).append(nerd_score(weight))
        del model
        gc.collect()
    composite = load(models[0])
    for name, row in scores.items():
        winner = row.index(max(row))  # first on ties: base, then input order
        if winner == 0:
            continue
        source = load(models[winner])  # the whole model, for one module
        composite.get_submodule(name).load_state_dict(
            source.get_submodule(name).state_dict()
        )
        del source
        gc.collect()
    composite.save_pretrained(out)


def child(mode: str, models: list[Path], work: Path) -> None:
    """Run one measured operation and print its figures as one JSON line."""
    # Imports first, so the figures time the work, not interpreter start-up.
    import mergekit.merge  # noqa: F401 - wrapped by the ner hook on import
    import transformers  # noqa: F401

    from ner_merge.plan.planner import plan
    from ner_merge.recipe.recipe import Recipe

    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if mode == "ner":
        mergekit_merge(write_recipe(work / "ner.yml", models, "ner"), work / "out")
    elif mode == "plan":
        recipe = Recipe.from_file(write_recipe(work / "plan.yml", models, "ner"))
        plan(recipe, quiet=True).save(work / "plan.json")
    elif mode == "merge-map":
        recipe = write_recipe(
            work / "map.yml", models, "ner", source_map=str(work / "plan.json")
        )
        mergekit_merge(recipe, work / "out")
    elif mode == "linear":
        mergekit_merge(write_recipe(work / "lin.yml", models, "linear"), work / "out")
    elif mode == "reference":
        reference_pipeline(models, work / "out")
    elif mode == "hash":
        print(json.dumps(hash_cost(models)))
        return
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": peak_resident_mb()}))


def hash_cost(models: list[Path]) -> dict:
    """Seconds per GB to read every tensor, and to hash (and NaN-check) it once
    read, as the planner does on a model it has not indexed yet."""
    from ner_merge.models.content import digest
    from ner_merge.models.reader import read_bytes
    from ner_merge.models.resolve import ResolvedModel

    reading = hashing = size = 0.0
    for path in models:
        for header in ResolvedModel(path.name, str(path), None).headers.values():
            start = time.perf_counter()
            data = read_bytes(header)
            middle = time.perf_counter()
            digest(header, data)
            reading += middle - start
            hashing += time.perf_counter() - middle
            size += len(data) / 1e9
    return {
        "seconds": reading + hashing,
        "peak_mb": peak_resident_mb(),
        "read_s_per_gb": reading / size,
        "hash_s_per_gb": hashing / size,
    }


def peak_resident_mb() -> float:
    """Peak resident memory of this process's own address space, in MB.

    Not ru_maxrss: Linux carries a parent's peak into a child started by
    vfork + exec, as subprocess does (measured: a parent holding 2 GB made an
    empty child report 2061 MB), so a parent that has just built the models
    would set every child's figure. VmHWM belongs to the child's own memory map.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, models: list[Path], work: Path, cache: Path) -> dict:
    """Run `mode` in a fresh interpreter with the given score cache folder."""
    env = dict(os.environ, NER_MERGE_CACHE_DIR=str(cache))
    command = [sys.executable, __file__, "--child", mode, "--work", str(work)]
    command += [str(m) for m in models]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  {mode:<10} {figures['seconds']:8.1f} s  {figures['peak_mb']:8.0f} MB peak",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 4 layers")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("models", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.models, args.work)
        return

    scale = SCALE["quick" if args.quick else "full"]
    layers = scale["num_hidden_layers"]
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"Qwen2 {scale['hidden_size']} wide, {layers} layers, "
        f"vocab {scale['vocab_size']}, bf16",
        flush=True,
    )
    full = build_trio(args.cache / "models", layers, scale)
    half = build_trio(args.cache / "models", layers // 2, scale)
    work = args.cache / "runs"
    shutil.rmtree(work, ignore_errors=True)

    print("plan + merge, full layers:")
    ner = measure("ner", full, work / "ner", work / "cache-ner")
    reference = measure("reference", full, work / "reference", work / "cache-ref")
    print("plan + merge, half the layers:")
    ner_half = measure("ner", half, work / "half", work / "cache-half")
    print("planning (first, then again with the score cache):")
    first = measure("plan", full, work / "plan", work / "cache-plan")
    second = measure("plan", full, work / "plan", work / "cache-plan")
    print("merging alone (ready source map) vs mergekit linear:")
    merge_map = measure("merge-map", full, work / "plan", work / "cache-plan")
    linear = measure("linear", full, work / "linear", work / "cache-lin")
    print("exact identity: reading and hashing every tensor of the trio:")
    hashed = measure("hash", full, work / "hash", work / "cache-hash")

    checks = [
        ("speed vs reference", reference["seconds"] / ner["seconds"], ">= 3", 3.0),
        ("peak RSS vs reference", reference["peak_mb"] / ner["peak_mb"], ">= 2", 2.0),
    ]
    half_ratio = ner["peak_mb"] / ner_half["peak_mb"]
    cached_share = second["seconds"] / first["seconds"]
    merge_ratio = merge_map["seconds"] / linear["seconds"]
    print("ratios:")
    for label, value, wanted, floor in checks:
        print(f"  {label}: {value:.2f}x (want {wanted}) {_ok(value >= floor)}")
    print(
        f"  peak RSS full / half layers: {half_ratio:.2f} (want <= 1.10) "
        f"{_ok(half_ratio <= 1.10)}"
    )
    print(
        f"  cached plan / first plan: {cached_share:.1%} (want < 10%) "
        f"{_ok(cached_share < 0.10)}"
    )
    print(
        f"  hashing: {hashed['hash_s_per_gb']:.2f} s/GB, on top of reading "
        f"{hashed['read_s_per_gb']:.2f} s/GB (from the page cache)"
    )
    print(
        f"  merge with map / linear merge: {merge_ratio:.2f}x (want <= 1.25) "
        f"{_ok(merge_ratio <= 1.25)}"
    )


def _ok(passed: bool) -> str:
    return "ok" if passed else "NOT MET"


if __name__ == "__main__":
    main()
