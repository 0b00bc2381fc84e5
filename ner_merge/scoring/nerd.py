"""The reference tool NERD's behaviour, for `compat: nerd` and `stabilize: true`.

NERD (the first public tool for this method) does not score the weights as
stored. It loads every model in bfloat16 and, per module with a `.weight`:

    x = weight as float32
    x = (x - min x) / max(max x - min x, 1e-10)      min-max scaling to [0, 1]
    x = x as bfloat16, back to float32               rounds to 8 significant bits
    a 1-D weight (a norm) is a 1 x n row
    s = |x| (flattened) if a dimension is 1, else the singular values of x
    score = NER of s (s > 1e-12, entropy in bits over log2 k)

The scaling makes every entry non-negative, so the top singular value mostly
measures the mean and the score is not the specification's NER. Singular values
are computed in float32 as NERD does (on the tall orientation, which has the same
values and is several times faster on CPU), so scores agree with NERD's to float32
rounding; the choices agree except on near-exact ties.

NERD gives any tensor that fails to score a 0, silently. That is *not*
reproduced: a NaN or Inf raises NonFiniteMatrixError, and the planner's
`nonfinite` option decides, as in every mode (`error` names model and tensor;
`lose` makes the copy lose, NERD's choice unless every other copy scores 0).

Stabilize is NERD's optional second stage, see `stabilize`.
"""

import torch

from ner_merge.scoring.ner import NonFiniteMatrixError, ner_from_singular_values

# Bump when nerd_score's result may change: it keys `compat: nerd` cache entries.
NERD_VERSION = 1

# NERD's floor on max - min, so a constant tensor scales to zeros, not to NaN.
MIN_MAX_FLOOR = 1e-10

# NERD scores every module's `.weight`; its other tensors (biases) go with it.
SCORED_SUFFIX = ".weight"


def scores_like_nerd(name: str, shape: tuple[int, ...]) -> bool:
    """Whether NERD scores this floating-point tensor: a 1-D or 2-D `.weight`."""
    return name.endswith(SCORED_SUFFIX) and len(shape) in (1, 2)


def nerd_view(weight: torch.Tensor) -> torch.Tensor:
    """The float32 matrix NERD takes singular values of (see the module docstring)."""
    x = weight.detach().to(torch.bfloat16).to(torch.float32)  # NERD loads bf16
    if not torch.isfinite(x).all():
        raise NonFiniteMatrixError("tensor holds NaN or Inf values")
    low, high = x.min(), x.max()
    x = (x - low) / torch.clamp(high - low, min=MIN_MAX_FLOOR)
    x = x.to(torch.bfloat16).to(torch.float32)
    return x.reshape(1, -1) if x.ndim == 1 else x


def nerd_score(weight: torch.Tensor) -> float:
    """NERD's score of one 1-D or 2-D weight."""
    x = nerd_view(weight)
    if min(x.shape) == 1:
        values = x.abs().flatten()
    else:
        values = torch.linalg.svdvals(x.T if x.shape[0] < x.shape[1] else x)
    return ner_from_singular_values(values)


def stabilizes(name: str) -> bool:
    """Whether NERD's second stage touches this tensor: a module's `.weight` only,
    never a bias."""
    return name.endswith(SCORED_SUFFIX)


def stabilize(base: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, int]:
    """NERD's second stage: (stabilized tensor, how many values came from the base).

    Where the base's value is at least as large in magnitude as the chosen one's,
    yet below the median magnitude of the chosen tensor, the base's value is put
    back: small entries that a fine-tune shrank return to the base. The median is
    torch.median's: the lower of the two middle values for an even count.
    Only comparisons and selection are done, in the tensors' own dtype, so the
    planner and the merge method compute bit-identical results.
    """
    base_magnitude, chosen_magnitude = base.abs(), chosen.abs()
    median = chosen_magnitude.flatten().median()
    from_base = (base_magnitude >= chosen_magnitude) & (base_magnitude < median)
    return torch.where(from_base, base, chosen), int(from_base.sum())
