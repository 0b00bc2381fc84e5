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

Whatever the storage dtype (bf16, fp16, fp32), the arithmetic is float64 and
every result carries a proven NER error below NER_TOLERANCE, so the score
depends on the stored values and on nothing else.

Route (see `singular_values`): the eigenvalues of the float64 Gram matrix
G = A^T A of the tall orientation, formed as a symmetric product (about half the
flops of a GEMM) from float64 copies of a few thousand rows at a time; a bound on
what rounding does to NER decides whether to trust them, and an exact float64
SVD replaces them when it does not (steep or near-singular spectra).

Why not float32 anywhere: float32 Gram eigenvalues carry errors near
1e-7 * lambda_max, and no bound built on that proves NER to 1e-6 even on
well-conditioned Gaussian matrices, let alone the count k of values above the
cut-off on square ones, whose smallest eigenvalue is ~1e-8 * lambda_max.
"""

import math

import torch

# Bump when a change can alter any score beyond rounding: cached scores made by
# another version are then ignored (see ner_merge.cache).
KERNEL_VERSION = 2

# Singular values at or below this are treated as exact zeros (the specification).
SINGULAR_VALUE_CUTOFF = 1e-12

# Rounding budget of one Gram eigenvalue, in units of sqrt(m) * eps * lambda_max.
# Forming A^T A and solving it are backward stable; typical errors are far below
# this, so a result that passes the guard is accurate with a wide margin.
GRAM_SAFETY_FACTOR = 100.0

# Largest NER error the Gram route may carry by its own error bound; beyond it an
# exact SVD decides. Far below the 1e-6 the product promises.
NER_TOLERANCE = 1e-10

# Column block of the symmetric Gram product: 28 block products of m x 512 x 512
# cover the lower triangle of a 3584-wide Gram matrix where a GEMM would do 49,
# and a 512-wide block still runs at full GEMM speed.
GRAM_BLOCK_COLUMNS = 512

# Rows converted to float64 at a time: the copy of a 151936 x 896 bf16 embedding
# stays at 8192 rows (59 MB) instead of 1.1 GB, and 8192-row products keep GEMMs
# efficient.
GRAM_BLOCK_ROWS = 8192

FLOAT64_EPS = torch.finfo(torch.float64).eps


class NonFiniteMatrixError(ValueError):
    """The matrix holds NaN or Inf, so it has no singular values to score."""


def singular_values(
    matrix: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Singular values of a 2-D tensor in float64 (any order), accurate for NER.

    The work runs on `device` (default: where the matrix is) and the result stays
    there. Forming G squares the condition number, so each eigenvalue carries an
    absolute error up to about delta = sqrt(m) * eps * lambda_max; when
    `_ner_error_within` cannot prove that harmless, a float64 SVD is computed.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    a = matrix.detach().to(device=device)
    if not torch.isfinite(a).all():
        raise NonFiniteMatrixError("matrix holds NaN or Inf values")
    if a.shape[0] < a.shape[1]:
        a = a.T  # tall orientation (m, n), m >= n: same singular values
    eigenvalues = torch.linalg.eigvalsh(gram_matrix(a))  # (n,), ascending
    delta = GRAM_SAFETY_FACTOR * math.sqrt(a.shape[0]) * FLOAT64_EPS
    if _ner_error_within(eigenvalues, delta * eigenvalues[-1].item()):
        return eigenvalues.sqrt()
    return torch.linalg.svdvals(a.to(torch.float64))


def gram_matrix(a: torch.Tensor) -> torch.Tensor:
    """A^T A (n x n, float64) of a tall (m, n) matrix of any float dtype.

    Rows are converted to float64 GRAM_BLOCK_ROWS at a time, so a bf16 embedding
    never exists whole in float64. Within a row block, blocks of
    GRAM_BLOCK_COLUMNS columns cover only the lower triangle, each product mirrored
    above the diagonal, as BLAS syrk does (torch exposes no syrk).
    """
    m, n = a.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=a.device)
    for start in range(0, m, GRAM_BLOCK_ROWS):
        rows = a[start : start + GRAM_BLOCK_ROWS].to(torch.float64)  # (r, n)
        for i in range(0, n, GRAM_BLOCK_COLUMNS):
            left = slice(i, i + GRAM_BLOCK_COLUMNS)
            for j in range(0, i + 1, GRAM_BLOCK_COLUMNS):
                right = slice(j, j + GRAM_BLOCK_COLUMNS)
                gram[left, right] += rows[:, left].T @ rows[:, right]
    lower = torch.tril(gram)
    return lower + torch.tril(gram, -1).T


def _ner_error_within(eigenvalues: torch.Tensor, delta: float) -> bool:
    """True when eigenvalues off by up to delta give NER within NER_TOLERANCE and
    the exact count k."""
    # Every eigenvalue must stand clear of its noise, and every singular value clear
    # of the cut-off, or the count k itself is in doubt.
    if eigenvalues[0].item() - delta <= max(delta, SINGULAR_VALUE_CUTOFF**2):
        return False
    s = eigenvalues.sqrt()
    s_error = delta / (2 * s)  # first-order error of sqrt(lambda)
    p = s / s.sum()
    # d(-p log2 p) = -(log2 p + 1/ln 2) dp, and dp is at most (ds + p * sum ds) / sum s
    dp = (s_error + p * s_error.sum()) / s.sum()
    entropy_error = ((p.log2().abs() + 1 / math.log(2)) * dp).sum().item()
    return entropy_error <= NER_TOLERANCE * math.log2(s.numel())


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
