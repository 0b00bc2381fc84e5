"""Benchmark scoring at scale: busy cores, local workers, a Ray cluster, more models.

Models: a base and eight fine-tunes, Qwen2 shapes 1024 wide with 4 layers, bf16
(random weights, built once into the cache folder); "the trio" is the first
three. Every plan is cold (an empty score cache of its own) and runs in a fresh
child process, which reports the seconds `plan()` took (imports excluded) and
its own peak resident memory (VmHWM, see bench_merge.peak_resident_mb); the map's
SHA-256 is compared; the wall time includes imports.
All rows come from one run, under the same settings (passive OpenMP waits, as
ner-merge sets them):

1. the trio with the default workers, idle and beside two CPU-bound processes;
2. --workers 1 vs --workers 2 on the trio: speed-up, and equal map bytes;
3. peak memory of 1 and 2 workers against the bound base + N x working set
   (base: a plan that scores nothing, every score cached; working set: that of
   the largest scored tensor, `ner_merge.scoring.streamed.working_set`);
4. a local 2-worker Ray cluster (127.0.0.1 only) vs local workers: map bytes;
5. nine models vs the trio, at 2 workers.

With --shapes, only this instead: seconds to score one matrix of each shape of
a 7B model (Qwen2.5-7B) and of a 70B one's attention (Llama-3-70B's 8192 x 8192)
at one thread, as a worker does, for the estimates in docs/scaling.md.

    python benchmarks/bench_scale.py [--cache DIR] [--shapes]
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_busy import LAYERS, SCALE, beside_busy_loops  # noqa: E402
from bench_merge import build_trio, peak_resident_mb, write_recipe  # noqa: E402

MODELS = 9

# Matrix shapes of Qwen2.5-7B (one each: q/o, k/v, MLP, embedding) and the
# 8192-wide attention of a 70B.
SHAPES = {
    "7B q_proj, o_proj": (3584, 3584),
    "7B k_proj, v_proj": (512, 3584),
    "7B gate, up, down": (18944, 3584),
    "7B embedding": (152064, 3584),
    "70B q_proj, o_proj": (8192, 8192),
}


def time_shapes() -> None:
    """Seconds per matrix at one thread (Gaussian bf16, as a worker scores)."""
    import torch

    from ner_merge.scoring.ner import normalized_effective_rank
    from ner_merge.scoring.workers import reproducible_scoring

    generator = torch.Generator().manual_seed(0)
    with reproducible_scoring():
        for label, shape in SHAPES.items():
            matrix = torch.randn(shape, generator=generator).bfloat16()
            start = time.perf_counter()
            normalized_effective_rank(matrix)
            seconds = time.perf_counter() - start
            print(f"  {label:<20} {shape[0]:>6} x {shape[1]:<5} {seconds:7.2f} s")
            del matrix


@dataclass(frozen=True)
class Run:
    wall: float  # seconds, process start to exit
    plan: float  # seconds inside plan()
    peak: int  # bytes, peak resident memory of the process
    map_sha: str


def child(recipe: str, workers: int | None, ray: str | None, out: str) -> None:
    """One plan in this fresh process; prints its Run fields as JSON."""
    from ner_merge.scoring.threads import wait_passively

    wait_passively()  # as the ner-merge entry points do
    from ner_merge.plan.planner import plan
    from ner_merge.recipe.recipe import Recipe
    from ner_merge.scoring.workers import choose_workers

    chosen = choose_workers(workers, ray)
    start = time.perf_counter()
    source_map = plan(Recipe.from_file(recipe), quiet=True, workers=chosen)
    seconds = time.perf_counter() - start
    source_map.save(out)
    print(json.dumps({"plan": seconds, "peak": peak_resident_mb() * (1 << 20)}))


def measure(
    recipe: Path,
    work: Path,
    workers: int | None = None,
    ray: str | None = None,
    cache: Path | None = None,
) -> Run:
    """A plan in a child process, with an empty cache unless `cache` is given."""
    if cache is None:
        cache = work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
    out = work / "map.json"
    command = [sys.executable, __file__, "--child", str(recipe), "--out", str(out)]
    command += ["--workers", str(workers)] if workers else []
    command += ["--ray", ray] if ray else []
    env = dict(os.environ, NER_MERGE_CACHE_DIR=str(cache))
    if ray:
        from ner_merge.scoring.cluster import LOOPBACK_ENVIRONMENT

        env.update(LOOPBACK_ENVIRONMENT)
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    output, _ = process.communicate()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"plan failed: {' '.join(command)}")
    report = json.loads(output.splitlines()[-1])
    return Run(
        wall=wall,
        plan=report["plan"],
        peak=int(report["peak"]),
        map_sha=hashlib.sha256(out.read_bytes()).hexdigest(),
    )


def largest_working_set(models: list[Path]) -> int:
    from ner_merge.models.resolve import ResolvedModel
    from ner_merge.scoring.streamed import working_set

    headers = ResolvedModel("base", str(models[0]), None).headers.values()
    return max(working_set(header) for header in headers if len(header.shape) == 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--shapes", action="store_true", help="time 7B/70B shapes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ray", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.workers, args.ray, args.out)
    if args.shapes:
        return time_shapes()

    from ner_merge.scoring.cluster import loopback_cluster
    from ner_merge.scoring.workers import default_count

    models = build_trio(args.cache / "models", LAYERS, dict(SCALE), count=MODELS)
    work = args.cache / "scale"
    work.mkdir(parents=True, exist_ok=True)
    trio = write_recipe(work / "trio.yml", models[:3], "ner")
    nine = write_recipe(work / "nine.yml", models, "ner")
    largest = largest_working_set(models)
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, default workers "
        f"{default_count(largest)}; Qwen2 {SCALE['hidden_size']} wide, {LAYERS} "
        f"layers, bf16; cold plans, passive OpenMP waits; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
        flush=True,
    )

    idle = measure(trio, work)
    busy = beside_busy_loops(2, lambda: measure(trio, work))
    print(
        f"1. trio, default workers: idle {idle.plan:.1f} s, beside 2 busy loops "
        f"{busy.plan:.1f} s: {busy.plan / idle.plan:.2f}x (target <= 2.6x)",
        flush=True,
    )

    one, two = measure(trio, work, workers=1), measure(trio, work, workers=2)
    print(
        f"2. trio, plan(): 1 worker {one.plan:.1f} s, 2 workers {two.plan:.1f} s: "
        f"{one.plan / two.plan:.2f}x faster (target >= 1.3x); whole command "
        f"{one.wall:.1f} s vs {two.wall:.1f} s: {one.wall / two.wall:.2f}x; "
        f"map bytes equal: {one.map_sha == two.map_sha}",
        flush=True,
    )

    warm = measure(trio, work, workers=1, cache=work / "warm-cache")  # fills it
    warm = measure(trio, work, workers=1, cache=work / "warm-cache")  # scores none
    mib = 1 << 20
    print(
        f"3. peak memory: nothing to score {warm.peak / mib:.0f} MiB; largest "
        f"working set {largest / mib:.0f} MiB",
        flush=True,
    )
    for count, run in ((1, one), (2, two)):
        bound = warm.peak + count * largest
        print(
            f"   {count} worker(s): {run.peak / mib:.0f} MiB, bound "
            f"{bound / mib:.0f} MiB: {'within' if run.peak <= bound else 'OVER'}",
            flush=True,
        )

    with loopback_cluster(workers=2) as address:
        clustered = measure(trio, work, ray=address)
    print(
        f"4. trio on a 2-worker Ray cluster: plan() {clustered.plan:.1f} s (local "
        f"2 workers {two.plan:.1f} s); map bytes equal to local: "
        f"{clustered.map_sha == one.map_sha}",
        flush=True,
    )

    nine_models = measure(nine, work, workers=2)
    print(
        f"5. nine models vs the trio, 2 workers: {nine_models.plan:.1f} s vs "
        f"{two.plan:.1f} s: {nine_models.plan / two.plan:.2f}x for 3x the models",
        flush=True,
    )


if __name__ == "__main__":
    main()
