"""Benchmark the NER kernel against float32 `torch.linalg.svdvals`, side by side.

For every shape of a Qwen2.5 0.5B / 7B model and every spectrum, one bf16 matrix
(as models store them) is scored three ways in the same process:

- the kernel (`ner_merge.ner.singular_values`);
- float32 svdvals on the tall orientation (wide matrices transposed first);
- float32 svdvals on the matrix as stored (the reference tool's way);

and each NER is compared with a float64 SVD reference, computed once per matrix
and kept in a cache folder (a 18944 x 3584 float64 SVD takes minutes here).

Timed spectra (their times are summed into the speed ratios): Gaussian and
power-law. Accuracy-only spectra (kernel vs reference; the kernel's exact
fallback runs there, so their times are reported but not summed): steep
(column scales 1 .. 1e-10) and near-singular (an eighth of the singular values
straddling the 1e-12 cut-off).

    python scripts/bench_ner.py [--quick] [--cache DIR]

With CUDA available, the kernel and svdvals are also timed on the GPU.
"""

import os

# On a shared CPU, OpenMP threads that spin while waiting make LAPACK calls 10-100x
# slower and their timings meaningless (measured here: eigvalsh of 256 x 256 took
# 0.6-1.6 s spinning, 0.01 s passive). Every side of every comparison runs with
# the same setting; it must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ner_merge.ner import ner_from_singular_values, singular_values

FULL_SHAPES = [
    (896, 896),
    (128, 896),
    (4864, 896),
    (896, 4864),
    (3584, 3584),
    (512, 3584),
    (18944, 3584),
    (3584, 18944),
    (151936, 896),
]
QUICK_SHAPES = [(256, 256), (64, 256), (1024, 256), (256, 1024), (4096, 128)]
TIMED_SPECTRA = ["gaussian", "power-law"]
ACCURACY_SPECTRA = ["steep", "near-singular"]
ACCEPTED_ERROR = 1e-6
REPEATS = 3
SEED = 0


def make_matrix(shape: tuple[int, int], spectrum: str) -> torch.Tensor:
    """A bf16 matrix of this shape whose spectrum has the named character.

    Power law: singular values 1/i with random singular vectors (trained weights
    decay more slowly; this is the harder case for the Gram route). The others
    start from Gaussian entries and scale the columns of the tall orientation:
    1 .. 1e-10 (steep), or the last eighth near 1e-12 / sqrt(m) so their singular
    values land around the cut-off (near-singular).
    """
    m, n = max(shape), min(shape)
    generator = torch.Generator().manual_seed(SEED + m * 7 + n)
    if spectrum == "power-law":
        u, _ = torch.linalg.qr(torch.randn(m, n, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
        tall = (u / torch.arange(1, n + 1)) @ v.T
    else:
        tall = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if spectrum == "steep":
        tall *= torch.logspace(0, -10, n, dtype=torch.float64)
    elif spectrum == "near-singular":
        tiny = n // 8
        tall[:, n - tiny :] *= torch.logspace(-0.5, 0.5, tiny) * 1e-12 / m**0.5
    matrix = tall if shape[0] >= shape[1] else tall.T
    return matrix.to(torch.bfloat16)


def reference_values(matrix: torch.Tensor, cache: Path) -> torch.Tensor:
    """float64 SVD of the matrix, from the cache when it was computed before.

    The cache key is a hash of the tall orientation's bytes: a wide shape finds its
    tall twin's entry, and a changed matrix never finds a stale one.
    """
    tall = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T
    tall = tall.contiguous()
    digest = hashlib.sha256(tall.view(torch.int16).numpy().tobytes()).hexdigest()
    path = cache / f"{tall.shape[0]}x{tall.shape[1]}-{digest[:16]}.pt"
    if path.exists():
        return torch.load(path)
    values = torch.linalg.svdvals(tall.double())
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(values, path)
    return values


def timed(function: Callable[[], torch.Tensor], device: str) -> tuple[float, float]:
    """(seconds, NER): the fastest of up to REPEATS calls, synchronising the GPU.

    Calls under a second are repeated: on a shared machine the minimum is the
    least disturbed measurement. Longer ones are timed once.
    """
    best = float("inf")
    for _ in range(REPEATS):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        values = function()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        if best > 1.0:
            break
    return best, ner_from_singular_values(values.cpu())


def svdvals32(matrix: torch.Tensor, tall: bool) -> torch.Tensor:
    """float32 svdvals, of the tall orientation or of the matrix as stored."""
    a = matrix.float()
    if tall and a.shape[0] < a.shape[1]:
        a = a.T
    return torch.linalg.svdvals(a)


def warm_up(device: str) -> None:
    """The first linear-algebra calls of a process are slow: pay for them here."""
    matrix = torch.randn(1024, 800, device=device).bfloat16()
    for _ in range(2):
        singular_values(matrix)
        svdvals32(matrix, tall=True)


def bench(shapes: list[tuple[int, int]], device: str, cache: Path) -> bool:
    """Print one row per matrix and the summed ratios; True when accurate."""
    warm_up(device)
    totals = {"kernel": 0.0, "tall": 0.0, "stored": 0.0}
    worst = 0.0
    header = (
        f"{'shape':>13} {'spectrum':>13} {'kernel s':>9} {'svd32 tall':>10} "
        f"{'svd32 stored':>12} {'x tall':>7} {'x stored':>8} "
        f"{'kernel err':>10} {'svd32 err':>9}"
    )
    print(f"device: {device}\n{header}", flush=True)
    for shape in shapes:
        for spectrum in TIMED_SPECTRA + ACCURACY_SPECTRA:
            matrix = make_matrix(shape, spectrum).to(device)
            exact = ner_from_singular_values(reference_values(matrix.cpu(), cache))
            kernel_s, kernel_ner = timed(partial(singular_values, matrix), device)
            error = kernel_ner - exact
            worst = max(worst, abs(error))
            row = f"{shape[0]:>6}x{shape[1]:<6} {spectrum:>13} {kernel_s:>9.3f}"
            if spectrum in TIMED_SPECTRA:
                tall_s, tall_ner = timed(partial(svdvals32, matrix, True), device)
                stored_s, _ = timed(partial(svdvals32, matrix, False), device)
                totals["kernel"] += kernel_s
                totals["tall"] += tall_s
                totals["stored"] += stored_s
                row += (
                    f" {tall_s:>10.3f} {stored_s:>12.3f} {tall_s / kernel_s:>7.2f}"
                    f" {stored_s / kernel_s:>8.2f} {error:>10.1e}"
                    f" {tall_ner - exact:>9.1e}"
                )
            else:
                row += f" {'':>10} {'':>12} {'':>7} {'':>8} {error:>10.1e}"
            print(row, flush=True)
    ok = worst <= ACCEPTED_ERROR
    print(
        f"sum over Gaussian and power-law matrices: kernel {totals['kernel']:.1f} s, "
        f"svd32 tall {totals['tall']:.1f} s, svd32 as stored {totals['stored']:.1f} s"
        f"\nspeed-up vs svd32 tall: {totals['tall'] / totals['kernel']:.2f}x; "
        f"vs svd32 as stored: {totals['stored'] / totals['kernel']:.2f}x"
        f"\nworst |NER error| of the kernel over all spectra: {worst:.1e} "
        f"({'within' if ok else 'OVER'} {ACCEPTED_ERROR:g})",
        flush=True,
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(".bench-cache/ner-references"),
        help="where float64 reference spectra are kept between runs",
    )
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    print(
        f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        flush=True,
    )
    ok = bench(shapes, "cpu", args.cache)
    if torch.cuda.is_available():
        print(f"\nGPU: {torch.cuda.get_device_name()}")
        ok = bench(shapes, "cuda", args.cache) and ok
    else:
        print("\nno CUDA device: GPU comparison skipped")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
