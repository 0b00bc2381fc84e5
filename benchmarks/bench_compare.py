"""Benchmark `ner-merge compare`: what the first recipe costs, and each later one.

A base and two fine-tunes with Qwen2.5-0.5B's shapes (random bf16 weights,
`bench_merge.build_trio`, given the demo's tokenizer so that they can be scored
on text) are compared under two NER recipes that differ only in `granularity`,
and their plain average (`--linear`), on the demo's three held-out texts, with an
empty score cache. The command runs as a child process, as a user runs it, and
its own step lines give each step's seconds; the wall time includes imports.

    python benchmarks/bench_compare.py [--quick] [--cache DIR]
"""

import os

# Passive OpenMP waits, as ner-merge sets them (see bench_merge.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import SCALE, build_trio, write_recipe  # noqa: E402

# "[3/11] merge layer.yml ... 2.1 s": kind, subject, seconds.
STEP_LINE = re.compile(r"^\[\d+/\d+\] (\w+)\s+(\S+) \.\.\. ([\d.]+) s$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    arguments = parser.parse_args()
    scale = SCALE["quick" if arguments.quick else "full"]
    models = build_trio(arguments.cache, scale["num_hidden_layers"], scale)
    from ner_merge.demo import HELD_OUT_TEXTS, TEXTS, train_tokenizer

    tokenizer = train_tokenizer()
    for model in models:
        tokenizer.save_pretrained(model)
    work = arguments.cache / "compare"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipes = [
        write_recipe(work / "tensor.yml", models, "ner"),
        write_recipe(work / "layer.yml", models, "ner", granularity="layer"),
    ]
    texts = [arg for name in HELD_OUT_TEXTS for arg in ("-t", str(TEXTS / name))]
    environment = dict(os.environ, NER_MERGE_CACHE_DIR=str(work / "score-cache"))
    command = ["ner-merge", "compare", *map(str, recipes), "--linear", *texts]
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "-o", str(work / "out")],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    wall = time.perf_counter() - start
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"Qwen2 {scale['hidden_size']} wide, {scale['num_hidden_layers']} layers, "
        f"vocabulary {scale['vocab_size']}, bf16; empty score cache"
    )
    evals = []
    for line in done.stderr.splitlines():
        step = STEP_LINE.match(line)
        if step and step[1] == "eval":
            evals.append(float(step[3]))
        elif step:
            print(f"{step[1]:<5} {step[2]:<10} {float(step[3]):7.1f} s")
    mean = sum(evals) / len(evals)
    print(f"eval  {len(evals)} models {sum(evals):8.1f} s (mean {mean:.1f} s)")
    print(f"whole command, with imports: {wall:.1f} s")
    print(done.stdout)


if __name__ == "__main__":
    main()
