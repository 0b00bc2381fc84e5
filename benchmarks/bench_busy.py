"""Benchmark planning on a busy machine: idle vs beside two CPU-bound processes.

A base and two fine-tunes, 1024 wide with 4 layers (random bf16 weights, built
once into the cache folder), are planned by `ner-merge plan` with an empty score
cache, each run a subprocess timed from outside:

- as ner-merge starts by default (it asks for passive OpenMP waiting itself);
- with `OMP_WAIT_POLICY=ACTIVE`, the spinning waits torch uses unless told.

Each twice: on the idle machine, and beside two busy loops (one per core of the
2-core machine this was written on). The ratio busy / idle is the figure: fair
sharing of 2 cores among 3 CPU-bound processes is about 1.5-2x.

    python benchmarks/bench_busy.py [--cache DIR]
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import build_trio, write_recipe  # noqa: E402

SCALE = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=8192,
)
LAYERS = 4
BUSY_LOOP = "while True: pass"


def timed_plan(recipe: Path, work: Path, policy: str | None) -> float:
    """Seconds for one cold `ner-merge plan` in a fresh process."""
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, NER_MERGE_CACHE_DIR=str(cache))
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    command = [str(Path(sys.executable).parent / "ner-merge"), "plan", str(recipe)]
    command += ["-o", str(work / "plan.json")]
    start = time.perf_counter()
    subprocess.run(command + ["--quiet"], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def beside_busy_loops(count: int, run):
    """run() while `count` CPU-bound processes compete for the cores."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        return run()
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs; Qwen2 trio "
        f"{SCALE['hidden_size']} wide, {LAYERS} layers, bf16; cold plans",
        flush=True,
    )
    models = build_trio(args.cache / "models", LAYERS, dict(SCALE))
    work = args.cache / "busy"
    work.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(work / "plan.yml", models, "ner")
    for label, policy in (("ner-merge default (passive)", None), ("ACTIVE", "ACTIVE")):
        idle = timed_plan(recipe, work, policy)
        busy = beside_busy_loops(2, lambda p=policy: timed_plan(recipe, work, p))
        print(
            f"  {label:<28} idle {idle:6.1f} s, beside 2 busy loops {busy:6.1f} s: "
            f"{busy / idle:.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
