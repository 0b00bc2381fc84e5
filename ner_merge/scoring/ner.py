"""Normalized Effective Rank (NER): the score that decides which model wins a tensor.

For a matrix A with singular values s_1 >= s_2 >= ... (values only):

    keep s_i > 1e-12, k = how many were kept
    p_i = s_i / sum(s)
    H   = -sum(p_i * log2(p_i))
    NER = H / log2(k)        (0 when k <= 1)

NER lies in [0, 1]: 1 when the energy is spread evenly over all directions (the
identity), 0 for a rank-1 matrix. It ignores scale, transposition and row or
column permutations; only the absolute 1e-12 cut-off is not scale-free, as the
specification says.

Two routes, both through the eigenvalues of the Gram matrix G = A^T A of the tall
orientation (m x n, m >= n), formed by BLAS syrk (the lower triangle only, half
the flops of a GEMM) from copies of a few thousand rows at a time:

- `normalized_effective_rank`, the exact score: float64 throughout, and every
  result carries a bounded NER error below NER_TOLERANCE, so the score depends
  on the stored values and on nothing else. An exact float64 SVD replaces the
  eigenvalues when their bound cannot prove that (steep or near-singular
  spectra).
- `fast_score`: float32 throughout, about twice as fast on a CPU (and far more on
  GPUs whose float64 is slow), returning the score with a bound on its distance
  to the exact score. What a merge needs exact is each decision, not each digit:
  the planner compares bounds and rescores only near ties exactly (see
  `ner_merge.plan.selection.uncertain_copies`).

Both bounds follow one error model: forming and solving G is backward stable, so
each eigenvalue is off by at most delta = GRAM_SAFETY_FACTOR * sqrt(n) * eps *
lambda_max (eps of the working precision), and `ner_error_bound` turns that into
a bound on NER. The absolute delta is what limits float32: a singular value below
about sqrt(delta) is lost in it, which squaring the matrix into G makes likely
for a square matrix (random or trained, its smallest singular values lie near
zero). So float32 is used only where it can bound its result: see `fast_score`.
"""

import math
from dataclasses import dataclass

import torch
from scipy.linalg.blas import dsyrk, ssyrk

# Bump when a change can alter any score beyond rounding, or what a worker returns:
# cached scores made by another version are then ignored (see ner_merge.scoring.cache),
# and a cluster's worker of another version refuses the job. Version 5: float32 scores
# with bounds (`fast_score`) beside the exact ones.
KERNEL_VERSION = 5

# Singular values at or below this are treated as exact zeros (the specification).
SINGULAR_VALUE_CUTOFF = 1e-12

# Rounding budget of one Gram eigenvalue, in units of sqrt(n) * eps * lambda_max.
# Forming and solving G is backward stable; the worst errors measured here (float64
# SVD references, shapes 896^2 to 151936 x 896 and 18944 x 3584, Gaussian,
# power-law and steep spectra) stayed below 1.6 units, with no growth in m. In
# float32 (ssyrk and ssyevd at one thread) the worst was 1.43 units (Gaussian bf16,
# 1536 x 384 to 30000 x 384; trained MiniLM weights 0.46), nearly all of it the
# eigensolver's: forming G alone stayed below 0.32.
GRAM_SAFETY_FACTOR = 10.0

# Largest NER error the float64 route may carry by its own bound (worst case over
# every eigenvalue's error and sign); beyond it an exact SVD decides. A tenth of
# the 1e-6 the product promises.
NER_TOLERANCE = 1e-7

# Largest relative doubt on any singular value the bound below accepts: it is a
# first-order bound made safe for steps this small, not for larger ones.
LARGEST_RELATIVE_DOUBT = 1e-2

# The float32 route takes a matrix only when its tall orientation is at least this
# many times taller than wide. A squarer matrix has singular values near zero
# (a square Gaussian one's smallest is about s_max / n) that float32 cannot bound:
# none of the 25 square matrices of trained MiniLM got a finite bound, so trying
# float32 first would only add its time. At 3:2 a Gaussian matrix's smallest
# singular value is a tenth of its largest, well inside what float32 resolves.
FAST_MIN_ASPECT = 1.5

# Storage dtypes whose every value float32 holds exactly: the float32 route sees
# the very matrix stored (float64 weights, rare, are scored exactly).
FLOAT32_EXACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Rows are converted in blocks of about this many elements (64 MB in float64):
# a 151936 x 896 bf16 embedding never exists whole in float64, and a 2340-row
# block of a 3584-wide matrix still keeps syrk at full speed.
GRAM_BLOCK_ELEMENTS = 1 << 23

# Column block of the symmetric product on devices without syrk (CUDA): 28 block
# products of m x 512 x 512 cover the lower triangle of a 3584-wide Gram matrix
# where a GEMM would do 49.
GRAM_BLOCK_COLUMNS = 512

FLOAT64_EPS = torch.finfo(torch.float64).eps
FLOAT32_EPS = torch.finfo(torch.float32).eps

# Smallest largest Gram eigenvalue the float32 route takes: below it, float32's
# absolute rounding floor (subnormal numbers) is no longer far below eps *
# lambda_max, which the error model assumes.
SMALLEST_FLOAT32_GRAM = torch.finfo(torch.float32).tiny / FLOAT32_EPS

SYRK = {torch.float64: dsyrk, torch.float32: ssyrk}


@dataclass(frozen=True)
class BoundedScore:
    """A score, and how far it may lie from the exact score of the same matrix
    (`normalized_effective_rank`): 0 when it is that score."""

    value: float
    bound: float = 0.0

    @property
    def exact(self) -> bool:
        return self.bound == 0.0


class NonFiniteMatrixError(ValueError):
    """The matrix holds NaN or Inf, so it has no singular values to score."""


def singular_values(
    matrix: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Singular values of a 2-D tensor in float64 (any order), accurate for NER.

    The work runs on `device` (default: where the matrix is) and the result stays
    there. Forming G squares the condition number, so each eigenvalue carries an
    absolute error up to about delta = sqrt(n) * eps * lambda_max; when
    `ner_error_bound` cannot prove that harmless, a float64 SVD is computed.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    a = matrix.detach().to(device=device)
    if a.shape[0] < a.shape[1]:
        a = a.T  # tall orientation (m, n), m >= n: same singular values
    gram = gram_lower_triangle(a)
    # A NaN or Inf entry spoils its column's diagonal entry: n checks, not m * n.
    if not torch.isfinite(gram.diagonal()).all():
        if not torch.isfinite(a).all():
            raise NonFiniteMatrixError("matrix holds NaN or Inf values")
        return torch.linalg.svdvals(a.to(torch.float64))  # squares beyond float64
    eigenvalues = torch.linalg.eigvalsh(gram, UPLO="L")  # ascending
    delta = GRAM_SAFETY_FACTOR * math.sqrt(a.shape[1]) * FLOAT64_EPS
    if ner_error_bound(eigenvalues, delta * eigenvalues[-1].item()) <= NER_TOLERANCE:
        return eigenvalues.sqrt()
    return torch.linalg.svdvals(a.to(torch.float64))


def gram_lower_triangle(
    a: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A^T A (n x n, in `dtype`: float64 or float32) of a tall (m, n) matrix of any
    float dtype, in the lower triangle only: eigvalsh reads no more, and mirroring
    a 3584-wide matrix would cost a third of the product's time.

    Rows are converted to `dtype` GRAM_BLOCK_ELEMENTS at a time.
    """
    block_rows = max(1, GRAM_BLOCK_ELEMENTS // a.shape[1])
    if a.device.type == "cpu":
        return _cpu_gram_lower(a, block_rows, dtype)
    return _blocked_gram_lower(a, block_rows, dtype)


def _cpu_gram_lower(
    a: torch.Tensor, block_rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """Gram matrix by BLAS syrk (torch has none), in Fortran order.

    Each block is copied into one reused buffer (fresh pages for every block cost
    more than the conversion) in its own layout, and handed to syrk as it lies: a
    C-ordered (r, n) block is to Fortran its transpose B, summed as B B^T; a wide
    matrix arrives transposed, and its block is copied as the C-ordered (n, r)
    matrix B^T, summed as B^T B.
    """
    m, n = a.shape
    syrk = SYRK[dtype]
    buffer = torch.empty(min(block_rows, m) * n, dtype=dtype)
    gram = None
    for start in range(0, m, block_rows):
        block = a[start : start + block_rows]
        size = block.numel()
        if block.stride(-1) == 1:
            rows = buffer[:size].view(block.shape).copy_(block).numpy()
            gram = syrk(1.0, rows.T, beta=1.0, c=gram, lower=1, overwrite_c=1)
        else:
            columns = buffer[:size].view(block.T.shape).copy_(block.T).numpy()
            gram = syrk(
                1.0, columns.T, beta=1.0, c=gram, trans=1, lower=1, overwrite_c=1
            )
    return torch.from_numpy(gram)


def _blocked_gram_lower(
    a: torch.Tensor, block_rows: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Gram matrix from GEMMs on the column blocks of its lower triangle (the
    diagonal blocks whole), as syrk would. float32 products must run at full
    precision, not TF32 (see `ner_merge.scoring.workers.reproducible_scoring`)."""
    n = a.shape[1]
    gram = torch.zeros(n, n, dtype=dtype, device=a.device)
    for start in range(0, a.shape[0], block_rows):
        rows = a[start : start + block_rows].to(dtype)
        for i in range(0, n, GRAM_BLOCK_COLUMNS):
            left = slice(i, i + GRAM_BLOCK_COLUMNS)
            for j in range(0, i + 1, GRAM_BLOCK_COLUMNS):
                right = slice(j, j + GRAM_BLOCK_COLUMNS)
                gram[left, right] += rows[:, left].T @ rows[:, right]
    return gram


def ner_error_bound(eigenvalues: torch.Tensor, delta: float) -> float:
    """Largest NER error if each Gram eigenvalue may be off by up to delta
    (infinite when even the count k of singular values above the cut-off is in
    doubt).

    With t_i = ln s_i, dH/dt_i = -p_i (log2 p_i + H): a common relative error of
    all s_i leaves NER unchanged, and the sum below weighs each value's doubt
    T_i = -ln(1 - delta / lambda_i) / 2 by how much it can move the entropy. Along
    the step p_i grows at most by exp(2 T) and log2 p_i moves at most 2 T / ln 2;
    the last lines bound those second-order effects.
    """
    if eigenvalues.numel() <= 1:
        return 0.0  # k <= 1 whatever the error: NER is 0
    if eigenvalues[0].item() - delta <= SINGULAR_VALUE_CUTOFF**2:
        return math.inf
    doubt = -torch.log1p(-delta / eigenvalues) / 2  # T_i, largest first
    largest = doubt[0].item()
    if largest > LARGEST_RELATIVE_DOUBT:
        return math.inf
    s = eigenvalues.sqrt()
    p = s / s.sum()
    entropy = -(p * p.log2()).sum()
    first_order = (p * (p.log2() + entropy).abs() * doubt).sum().item()
    spread = (p * doubt).sum().item()
    growth = math.exp(2 * largest)
    entropy_error = (growth * (first_order + 2 * largest * spread / math.log(2))) / (
        1 - growth * spread
    )
    return entropy_error / math.log2(s.numel())


def ner_from_singular_values(values: torch.Tensor) -> float:
    """NER of a set of singular values (any order), by the definition above."""
    kept = values.to(torch.float64)
    kept = kept[kept > SINGULAR_VALUE_CUTOFF]
    k = kept.numel()
    if k <= 1:
        return 0.0
    p = kept / kept.sum()
    entropy_bits = -(p * torch.log2(p)).sum().item()
    return entropy_bits / math.log2(k)


def normalized_effective_rank(
    matrix: torch.Tensor, device: torch.device | str | None = None
) -> float:
    """NER of a 2-D weight matrix; raises NonFiniteMatrixError on NaN or Inf."""
    return ner_from_singular_values(singular_values(matrix, device))


def fast_score(
    matrix: torch.Tensor, device: torch.device | str | None = None
) -> BoundedScore:
    """NER of a 2-D weight matrix from float32 arithmetic, with a bound on its
    distance to `normalized_effective_rank` of the same matrix.

    The float32 route: G in float32 (bf16 and fp16 products are exact in float32,
    only the sums round), its float32 eigenvalues, and `ner_error_bound` with
    delta = GRAM_SAFETY_FACTOR * sqrt(n) * eps32 * lambda_max; the exact score may
    lie NER_TOLERANCE further. Where float32 cannot give a finite bound (a squarer
    matrix than FAST_MIN_ASPECT, small singular values lost in delta, values whose
    squares leave float32's range, float64 storage) the exact score is returned,
    with bound 0. Raises NonFiniteMatrixError on NaN or Inf.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    a = matrix.detach().to(device=device)
    if a.shape[0] < a.shape[1]:
        a = a.T
    m, n = a.shape
    if a.dtype in FLOAT32_EXACT_DTYPES and m >= FAST_MIN_ASPECT * n:
        gram = gram_lower_triangle(a, torch.float32)
        top = gram.diagonal().max().item()  # NaN if a value is NaN
        # delta as a share of the computed lambda_max (the true one may exceed
        # it by delta itself).
        unit = GRAM_SAFETY_FACTOR * math.sqrt(n) * FLOAT32_EPS
        share = unit / (1 - unit)
        if SMALLEST_FLOAT32_GRAM <= top < math.inf and _may_bound(gram, share * top):
            eigenvalues = torch.linalg.eigvalsh(gram, UPLO="L")
            eigenvalues = eigenvalues.to("cpu", torch.float64)  # ascending
            bound = ner_error_bound(eigenvalues, share * eigenvalues[-1].item())
            if bound < math.inf:
                value = ner_from_singular_values(eigenvalues.sqrt())
                return BoundedScore(value, bound + NER_TOLERANCE)
    return BoundedScore(normalized_effective_rank(matrix, device))


def _may_bound(gram: torch.Tensor, delta: float) -> bool:
    """Whether G's smallest eigenvalue may be large enough for `ner_error_bound`
    to be finite with this delta: a Cholesky factorization of G shifted down by
    that limit (a sixth of an eigensolve's time) fails when it is not, sparing a
    matrix float32 cannot score (trained or power-law, with small singular
    values) the eigensolve. delta from the largest diagonal entry, which is at
    most lambda_max: the test may pass a matrix whose bound is then infinite,
    never fail one whose bound is finite (up to the factorization's rounding).
    """
    limit = delta / -math.expm1(-2 * LARGEST_RELATIVE_DOUBT)  # where doubt hits it
    shifted = gram.clone()
    shifted.diagonal().sub_(limit)
    return torch.linalg.cholesky_ex(shifted).info.item() == 0
