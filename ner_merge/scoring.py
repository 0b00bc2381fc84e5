"""Scoring: every model's score of every tensor the rules need, streamed.

Reading is one tensor of one model at a time, into a buffer of its own
(`ner_merge.reader`), so scoring a 7B trio holds one matrix and its Gram matrix,
never a model (token-indexed tensors under a tokenizer option are the exception:
mergekit aligns all models' copies together, see vocabulary.py). Every copy read
is hashed (`ner_merge.content`); scores already in the score cache under that
hash are neither read nor computed again.
"""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import tqdm
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from ner_merge.cache import ScoreCache
from ner_merge.errors import ModelError, NerMergeError
from ner_merge.inventory import OutputTensor
from ner_merge.models import ResolvedModel
from ner_merge.ner import (
    KERNEL_VERSION,
    NonFiniteMatrixError,
    normalized_effective_rank,
)
from ner_merge.nerd import (
    NERD_VERSION,
    nerd_score,
    scores_like_nerd,
    stabilize,
    stabilizes,
)
from ner_merge.selection import TensorSpec
from ner_merge.source_map import TensorChoice
from ner_merge.vocabulary import VocabularyAlignment

LOG = logging.getLogger(__name__)


def check_device(merge_options: MergeOptions) -> None:
    """Refuse a scoring device torch cannot compute on, before any model is read.

    mergekit's --cuda without CUDA, or a device with no kernels (`meta`), would
    otherwise fail at the first matrix scored, or pass unnoticed when every score
    is cached. Scoring a 2 x 2 identity there is the test: it allocates, runs the
    kernel's float64 arithmetic and copies a number back.
    """
    device = merge_options.device
    cuda = merge_options.cuda and device == "cuda"
    option = "--cuda" if cuda else f"--device {device}"
    try:
        normalized_effective_rank(torch.eye(2), device)
    except Exception as error:  # torch raises many kinds for a bad device
        reason = next(iter(str(error).strip().splitlines()), "")  # first line only
        raise NerMergeError(
            f"{option}: torch cannot score on this device "
            f"({type(error).__name__}: {reason})"
        ) from None


@dataclass(frozen=True)
class Scoring:
    """Which output tensors are scored, and how (the spec's NER or NERD's).

    The version is part of every cache key, so changing how a mode scores
    invalidates exactly that mode's cached scores.
    """

    name: str
    version: int
    selects: Callable[[OutputTensor], bool]
    score: Callable[[torch.Tensor], float]

    @property
    def cache_options(self) -> dict[str, object]:
        return {"scoring": self.name, "version": self.version}

    def spec(self, tensor: OutputTensor) -> TensorSpec:
        """The tensor as selection sees it."""
        return TensorSpec(
            name=tensor.name,
            layer=tensor.layer,
            shape=tensor.shape,
            scored=self.selects(tensor),
            floating=tensor.is_float,
            base_only=tensor.base_only,
        )


SPEC_SCORING = Scoring(
    "ner", KERNEL_VERSION, lambda t: t.is_matrix, normalized_effective_rank
)
NERD_SCORING = Scoring(
    "nerd",
    NERD_VERSION,
    lambda t: t.is_float and scores_like_nerd(t.name, t.shape),
    nerd_score,
)


class CopyReader:
    """Every model's copy of an output tensor, as mergekit will hand it over.

    Plain tensors are read one model at a time, each into a buffer of its own
    (`ner_merge.reader`). Token-indexed tensors under a tokenizer option are read
    together and aligned by mergekit's own code.
    """

    def __init__(
        self, models: list[ResolvedModel], vocabulary: VocabularyAlignment | None
    ):
        self.models = models
        self.references = [ModelReference.parse(m.path) for m in models]
        self.vocabulary = vocabulary

    def is_aligned(self, tensor: OutputTensor) -> bool:
        """True when a copy depends on every model's vocabulary, not its own file."""
        return tensor.aligned_axis is not None and self.vocabulary is not None

    def copies(
        self, tensor: OutputTensor, dtype: torch.dtype | None = None
    ) -> Iterator[torch.Tensor]:
        """Each candidate's copy in candidate order, cast to `dtype` if given."""
        cast = (self.copy(tensor, index, dtype) for index in range(len(self.models)))
        if not self.is_aligned(tensor):
            yield from cast
            return
        aligned = self.vocabulary.align(
            tensor.name, tensor.aligned_axis, dict(zip(self.references, cast))
        )
        yield from (aligned[reference] for reference in self.references)

    def copy(
        self, tensor: OutputTensor, index: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Candidate `index`'s copy as stored (not aligned), cast to `dtype` if
        given; its digest is kept."""
        copy = self.models[index].content.read(tensor.stored_names[index])
        return copy if dtype is None else copy.to(dtype)


def score_matrices(
    tensors: list[OutputTensor],
    models: list[ResolvedModel],
    reader: CopyReader,
    scoring: Scoring = SPEC_SCORING,
    nonfinite: str = "error",
    quiet: bool = False,
    cache: ScoreCache | None = None,
    device: str | None = None,
) -> dict[str, list[float | None]]:
    """Every model's score of every given tensor, streamed one tensor at a time.

    A copy holding NaN or Inf stops the plan, naming model and tensor, unless
    `nonfinite` is "lose": then its score is None, which loses to any number.
    The cache is keyed on each copy's content hash: a copy whose hash is known
    (its file is indexed) and scored is not even read; a copy read for its hash
    may still find its score (another model stores the same bytes). Each new
    score is stored at once, so an interrupted plan keeps its work. Aligned
    copies (`CopyReader.is_aligned`) depend on every model's vocabulary at once,
    so they bypass the cache. Scoring runs on `device` (mergekit's --device).
    """
    scores: dict[str, list[float | None]] = {}
    progress = tqdm.tqdm(
        total=len(tensors) * len(models),
        desc="NER scoring",
        unit="tensor",
        disable=quiet,
    )
    with progress:
        for tensor in tensors:
            aligned = reader.copies(tensor) if reader.is_aligned(tensor) else None
            usable = None if aligned else cache
            row = []
            for index, (model, stored) in enumerate(zip(models, tensor.stored_names)):
                known = model.content.known(stored)
                score = usable.get(known.hash) if usable and known else None
                if score is None:
                    copy = next(aligned) if aligned else reader.copy(tensor, index)
                    tensor_hash = model.content.known(stored).hash
                    if usable and not known:  # another model's identical copy?
                        score = usable.get(tensor_hash)
                    if score is None:
                        where = f"model {model.name}: tensor {stored}"
                        score = _score(copy, scoring, device, nonfinite, where)
                        if usable and score is not None:
                            usable.put(tensor_hash, score)
                    del copy
                row.append(score)
                progress.update()
            scores[tensor.name] = row
    return scores


def _score(
    copy: torch.Tensor, scoring: Scoring, device: str | None, nonfinite: str, where: str
) -> float | None:
    """One copy's score; None for a non-finite copy when `nonfinite` is "lose"."""
    try:
        return scoring.score(copy.to(device) if device else copy)
    except NonFiniteMatrixError:
        if nonfinite != "lose":
            raise ModelError(
                f"{where} holds NaN or Inf values (set `nonfinite: lose` to let "
                "such copies lose instead)"
            ) from None
        LOG.warning("%s holds NaN or Inf; it loses this tensor", where)
        return None


def nonfinite_copies(
    tensors: list[OutputTensor], models: list[ResolvedModel]
) -> dict[str, list[bool]]:
    """Per floating-point tensor with a NaN or Inf anywhere: which copies hold one.

    Copies not yet read are read (a norm, a bias: small), so a bad value in a
    tensor that no rule scores is found too, and before any scoring when asked
    for the unscored tensors first.
    """
    found = {}
    for tensor in tensors:
        if tensor.is_float:
            flags = [
                stored is not None and not model.content.finite(stored)
                for model, stored in zip(models, tensor.stored_names)
            ]
            if any(flags):
                found[tensor.name] = flags
    return found


def check_finite(
    nonfinite: dict[str, list[bool]], tensors: list[OutputTensor], names: list[str]
) -> None:
    """Refuse (`nonfinite: error`) naming every copy that holds NaN or Inf."""
    stored = {tensor.name: tensor.stored_names for tensor in tensors}
    problems = [
        f"model {model}: tensor {stored[name][index]} holds NaN or Inf values"
        for name, flags in nonfinite.items()
        for index, model in enumerate(names)
        if flags[index]
    ]
    if problems:
        raise ModelError(
            "\n  ".join(problems)
            + "\n(set `nonfinite: lose` to let such copies lose instead)"
        )


def stabilized(
    tensors: list[OutputTensor],
    choices: dict[str, TensorChoice],
    reader: CopyReader,
    names: list[str],
    dtype: torch.dtype | None,
) -> dict[str, TensorChoice]:
    """Choices with the share of base values the stabilize stage puts back, in
    every `.weight` not taken from the base (NERD's stage 2 leaves biases alone).

    Computed on the copies exactly as the merge method will see them (cast to the
    recipe's dtype, aligned), with the same function, so the map states what the
    merge writes. Only the base's and the chosen copy are read, except for a
    token-indexed tensor under a tokenizer option, which aligns every copy.
    A choice that already states its share (a hand-edited map) keeps it.
    """
    result = dict(choices)
    for tensor in tensors:
        choice = choices[tensor.name]
        source = names.index(choice.source)
        if (
            not tensor.is_float
            or source == 0
            or not stabilizes(tensor.name)
            or choice.stabilized is not None
        ):
            continue
        if reader.is_aligned(tensor):
            copies = list(reader.copies(tensor, dtype))
            base, chosen = copies[0], copies[source]
        else:
            base, chosen = (reader.copy(tensor, i, dtype) for i in (0, source))
        _, from_base = stabilize(base, chosen)
        result[tensor.name] = choice.model_copy(
            update={"stabilized": from_base / base.numel()}
        )
    return result
