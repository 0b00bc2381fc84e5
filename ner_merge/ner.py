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

Whatever the storage dtype (bf16, fp16, fp32), the arithmetic is float64, so the
score depends on the stored values and on nothing else.
"""

import math

import torch

# Singular values at or below this are treated as exact zeros (the specification).
SINGULAR_VALUE_CUTOFF = 1e-12

# Rounding budget of one Gram eigenvalue, in units of sqrt(m) * eps * lambda_max.
# Forming A^T A and solving it are backward stable; typical errors are far below
# this, so a result that passes the guard is accurate with a wide margin.
GRAM_SAFETY_FACTOR = 100.0

# Largest NER error the fast route may carry by its own error bound; beyond it an
# exact SVD decides. Far below the 1e-6 the product promises.
NER_TOLERANCE = 1e-10

FLOAT64_EPS = torch.finfo(torch.float64).eps


class NonFiniteMatrixError(ValueError):
    """The matrix holds NaN or Inf, so it has no singular values to score."""


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor in float64 (any order), accurate for NER.

    Fast route: the eigenvalues of the Gram matrix G = A^T A (n x n, n the smaller
    side) are the squared singular values; in float64 that is one GEMM and a small
    symmetric eigensolve, several times cheaper than an SVD. Forming G squares the
    condition number, so each eigenvalue carries an absolute error up to about
    delta = sqrt(m) * eps * lambda_max. `_gram_is_reliable` bounds what that error
    does to NER and to the count k of values above the cut-off; when the bound is
    not tiny (near-singular or steep spectra), an exact SVD is computed instead.
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    a = matrix.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        raise NonFiniteMatrixError("matrix holds NaN or Inf values")
    if a.shape[0] < a.shape[1]:
        a = a.T  # tall orientation (m, n), m >= n: same singular values, faster
    eigenvalues = torch.linalg.eigvalsh(a.T @ a)  # (n,), ascending
    if _gram_is_reliable(eigenvalues, rows=a.shape[0]):
        return eigenvalues.sqrt()
    return torch.linalg.svdvals(a)


def _gram_is_reliable(eigenvalues: torch.Tensor, rows: int) -> bool:
    """True when Gram eigenvalues give NER within NER_TOLERANCE and the exact k."""
    delta = GRAM_SAFETY_FACTOR * math.sqrt(rows) * FLOAT64_EPS * eigenvalues[-1]
    # Every eigenvalue must stand clear of its noise, and every singular value clear
    # of the cut-off, or the count k itself is in doubt.
    if eigenvalues[0] - delta <= max(delta, SINGULAR_VALUE_CUTOFF**2):
        return False
    s = eigenvalues.sqrt()
    s_error = delta / (2 * s)  # first-order error of sqrt(lambda)
    p = s / s.sum()
    # d(-p log2 p) = -(log2 p + 1/ln 2) dp, and dp is at most (ds + p * sum ds) / sum s
    dp = (s_error + p * s_error.sum()) / s.sum()
    entropy_error = ((p.log2().abs() + 1 / math.log(2)) * dp).sum()
    return bool(entropy_error <= NER_TOLERANCE * math.log2(s.numel()))


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


def normalized_effective_rank(matrix: torch.Tensor) -> float:
    """NER of a 2-D weight matrix; raises NonFiniteMatrixError on NaN or Inf."""
    return ner_from_singular_values(singular_values(matrix))
