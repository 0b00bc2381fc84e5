"""Scoring: every model's score of every tensor the rules need, streamed.

A worker reads one copy of one tensor at a time, into a buffer of its own
(`ner_merge.models.reader`), so scoring a 7B trio holds one matrix and its Gram matrix
per worker, never a model (token-indexed tensors under a tokenizer option are
the exception: mergekit aligns all models' copies together, see vocabulary.py).
Every copy read is hashed (`ner_merge.models.content`); scores already in the score
cache under that hash are neither read nor computed again. Workers run in this
process (`ner_merge.scoring.workers`) or on a Ray cluster (`ner_merge.scoring.cluster`),
and give the same scores to the last bit either way.
"""

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import torch
import tqdm
from mergekit.common import ModelReference
from mergekit.options import MergeOptions

from ner_merge.errors import ModelError, NerMergeError, torch_failure
from ner_merge.models.content import TensorDigest, digest
from ner_merge.models.inventory import OutputTensor
from ner_merge.models.reader import TensorHeader, as_tensor, read_bytes
from ner_merge.models.resolve import HubFile, ResolvedModel
from ner_merge.models.vocabulary import VocabularyAlignment
from ner_merge.recipe.options import NerOptions, ScoringRoute
from ner_merge.scoring.cache import ScoreCache
from ner_merge.scoring.ner import (
    KERNEL_VERSION,
    BoundedScore,
    NonFiniteMatrixError,
    fast_score,
    normalized_effective_rank,
)
from ner_merge.scoring.nerd import NERD_VERSION, nerd_score, scores_like_nerd
from ner_merge.scoring.workers import LocalWorkers, Workers, reproducible_scoring

LOG = logging.getLogger(__name__)


def check_device(merge_options: MergeOptions) -> None:
    """Refuse a scoring device torch cannot compute on, before any model is read.

    mergekit's --cuda without CUDA, or a device with no kernels (`meta`), would
    otherwise fail at the first matrix scored, or pass unnoticed when every score
    is cached. Scoring a small tall matrix there is the test: it allocates, runs
    both routes' arithmetic (float32 and float64) and copies numbers back.
    """
    device = merge_options.device
    cuda = merge_options.cuda and device == "cuda"
    option = "--cuda" if cuda else f"--device {device}"
    try:
        fast_score(torch.eye(4, 2), device)
        normalized_effective_rank(torch.eye(4, 2), device)
    except Exception as error:  # torch raises many kinds for a bad device
        raise NerMergeError(
            f"{option}: torch cannot score on this device ({torch_failure(error)})"
        ) from None


# "fast": float32 scores with bounds, rescored exactly where a decision needs
# it; "exact": every score exact (see ner_merge.scoring.ner).
Precision = Literal["fast", "exact"]


def device_kind(device: str | None) -> str:
    """The kind of a torch device (`cuda` for `cuda:1`); none given: the CPU."""
    return str(device or "cpu").split(":")[0]


def scoring_route(options: NerOptions, device: str | None) -> ScoringRoute:
    """The route a plan's scores take on `device`, and why (the map records both).

    `scoring: auto` is `exact` on a CPU: there float32 is at best twice as fast
    per matrix, yet close fine-tunes make near ties of most decisions, which cost
    a float32 score and then a float64 one, so fast plans measured 4-48% slower
    than exact ones on every model set tried (docs/performance.md). On other
    devices (GPUs) float64 runs at a small fraction of float32's speed, so
    `auto` is `fast`. The reason names the device's kind only, so maps are the
    same on any GPU of a kind and for any worker count.
    """
    if options.compat == "nerd":
        reason = "compat: nerd scores by NERD's own float32 rule"
        return ScoringRoute(scoring="nerd", reason=reason)
    if options.scoring != "auto":
        reason = f"asked for (scoring: {options.scoring})"
        return ScoringRoute(scoring=options.scoring, reason=reason)
    kind = device_kind(device)
    if kind == "cpu":
        reason = "auto on cpu: float32 saves no time on a CPU, near ties cost both"
        return ScoringRoute(scoring="exact", reason=reason)
    reason = f"auto on {kind}: float64 is many times slower than float32 there"
    return ScoringRoute(scoring="fast", reason=reason)


@dataclass(frozen=True)
class Scoring:
    """Which output tensors are scored, and how (the spec's NER or NERD's).

    `exact` is the score every decision must agree with; `fast`, where a mode has
    one, a cheaper score with a bound on its distance to it. The version is part
    of every cache key, so changing how a mode scores invalidates exactly that
    mode's cached scores.
    """

    name: str
    version: int
    selects: Callable[[OutputTensor], bool]
    exact: Callable[[torch.Tensor], float]
    fast: Callable[[torch.Tensor], BoundedScore] | None = None

    def cache_options(self, device: str | None) -> dict[str, object]:
        """What a cached score depends on besides its bytes and precision: this
        mode, its version, and the kind of device (float32 rounds otherwise on a
        GPU)."""
        kind = device_kind(device)
        return {"scoring": self.name, "version": self.version, "device": kind}

    def precision(self, wanted: Precision) -> Precision:
        """The precision this mode scores in when `wanted` is asked for: a mode
        without a fast score is always exact."""
        return wanted if self.fast is not None else "exact"

    def score(self, matrix: torch.Tensor, precision: Precision) -> BoundedScore:
        if self.precision(precision) == "fast":
            return self.fast(matrix)
        return BoundedScore(self.exact(matrix))


SPEC_SCORING = Scoring(
    "ner",
    KERNEL_VERSION,
    lambda t: t.is_matrix,
    exact=normalized_effective_rank,
    fast=fast_score,
)
NERD_SCORING = Scoring(
    "nerd",
    NERD_VERSION,
    lambda t: t.is_float and scores_like_nerd(t.name, t.shape),
    exact=nerd_score,
)
SCORINGS = {scoring.name: scoring for scoring in (SPEC_SCORING, NERD_SCORING)}


class CopyReader:
    """Every model's copy of an output tensor, as mergekit will hand it over.

    Plain tensors are read one model at a time, each into a buffer of its own
    (`ner_merge.models.reader`). Token-indexed tensors under a tokenizer option are read
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


@dataclass(frozen=True)
class CopyJob:
    """One model's copy of one tensor, to read, digest and score: all a worker
    needs, in this process or on another machine (`ner_merge.scoring.cluster`)."""

    where: str  # "model NAME: tensor NAME", for messages
    header: TensorHeader
    scoring: str  # a key of SCORINGS
    version: int  # the scoring's version where the job was made
    precision: Precision = "exact"
    device: str | None = None
    hub_file: HubFile | None = None  # where a worker lacking the path finds it


@dataclass(frozen=True)
class ScoredCopy:
    """What a worker found: the copy's digest and score (None: not finite, so not
    scored); `fresh` when computed, not taken from the cache."""

    digest: TensorDigest
    score: BoundedScore | None
    fresh: bool = True


class SharedScores:
    """Scores by content hash for the workers of one run: the cache's, and those
    being computed, so a copy whose bytes another worker is scoring (a tensor a
    fine-tune left alone) waits for that score instead of computing it again."""

    def __init__(self, cache: ScoreCache | None) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._scores: dict[tuple[str, Precision], Future] = {}

    def score(
        self,
        tensor_hash: str,
        precision: Precision,
        compute: Callable[[], BoundedScore],
    ) -> tuple[BoundedScore, bool]:
        """The score of these bytes in this precision: cached, computed by
        another worker, or computed here by `compute` (then `fresh`)."""
        with self._lock:
            owner = (tensor_hash, precision) not in self._scores
            future = self._scores.setdefault((tensor_hash, precision), Future())
        if not owner:
            return future.result(), False
        try:
            score = self.cache.get(tensor_hash, precision) if self.cache else None
            fresh = score is None
            future.set_result(compute() if fresh else score)
        except BaseException as error:
            future.set_exception(error)
            raise
        return future.result(), fresh


def score_copy(
    job: CopyJob, scoring: Scoring, shared: SharedScores | None = None
) -> ScoredCopy:
    """Read, digest and score one copy; `shared` may already know its score.

    Scoring runs in whatever thread limits the caller set: the workers hold
    them at one thread (`ner_merge.scoring.workers`), so scores never depend on where
    they were computed.
    """
    header = job.header
    if job.hub_file is not None and not os.path.exists(header.path):
        header = replace(header, path=job.hub_file.local_path())
    try:
        data = read_bytes(header)
    except OSError as error:
        raise ModelError(f"{job.where}: cannot read {header.path} ({error})") from None
    found = digest(header, data)
    if not found.finite:
        return ScoredCopy(found, None)

    def compute() -> BoundedScore:
        copy = as_tensor(header, data)
        copy = copy.to(job.device) if job.device else copy
        return scoring.score(copy, job.precision)

    if shared is None:
        return ScoredCopy(found, compute())
    score, fresh = shared.score(found.hash, job.precision, compute)
    return ScoredCopy(found, score, fresh)


def score_elsewhere(job: CopyJob) -> ScoredCopy:
    """`score_copy` in another process (a cluster's worker): the scoring named by
    the job, if it is the version the plan asked for, in reproducible settings."""
    scoring = SCORINGS[job.scoring]
    if scoring.version != job.version:
        raise NerMergeError(
            f"{job.where}: this worker scores {job.scoring} version "
            f"{scoring.version}, the plan asked for {job.version}; install the "
            "same ner-merge everywhere"
        )
    with reproducible_scoring():
        return score_copy(job, scoring)


def working_set(header: TensorHeader) -> int:
    """Most bytes one copy's scoring holds: its stored bytes, a float64 copy and
    two float64 matrices as wide as its narrow side (the Gram matrix and LAPACK's
    workspace). A 1-D tensor (NERD scores norms) is one row: its narrow side is 1.
    """
    numel = math.prod(header.shape)
    narrow = min(header.shape) if len(header.shape) == 2 else 1
    return header.end - header.start + 8 * (numel + 2 * narrow * narrow)


# One candidate's copy of one output tensor: (tensor name, candidate index).
Place = tuple[str, int]


def every_copy(
    tensors: list[OutputTensor], count: int, precision: Precision
) -> dict[Place, Precision]:
    """Every candidate's copy of every given tensor, all in one precision."""
    return {(t.name, index): precision for t in tensors for index in range(count)}


def scoring_progress(copies: int, quiet: bool) -> tqdm.tqdm:
    """A plan's one progress bar: it counts copies of scored tensors (one model's
    copy of one tensor), cached ones as done at once. Its total starts at the
    copies a plan scores once each and grows by each near tie's refinements, so
    it ends at every score the plan took, whatever its route."""
    return tqdm.tqdm(
        total=copies, desc="NER scoring (tensor copies)", unit="copy", disable=quiet
    )


def score_matrices(
    tensors: list[OutputTensor],
    models: list[ResolvedModel],
    reader: CopyReader,
    wanted: dict[Place, Precision],
    scoring: Scoring = SPEC_SCORING,
    nonfinite: str = "error",
    quiet: bool = False,
    cache: ScoreCache | None = None,
    device: str | None = None,
    workers: Workers | None = None,
    progress: tqdm.tqdm | None = None,
) -> dict[Place, BoundedScore | None]:
    """The scores of the wanted copies of the given tensors, each in the
    precision asked for (where the scoring mode has it).

    A copy holding NaN or Inf stops the plan, naming model and tensor, unless
    `nonfinite` is "lose": then its score is None, which loses to any number.
    The cache is keyed on each copy's content hash: a copy whose hash is known
    (its file is indexed) and scored is not even read; a copy read for its hash
    may still find its score (another model stores the same bytes). Each new
    score is stored at once, so an interrupted plan keeps its work.

    The other copies are scored by `workers` (one local worker by default), each
    in reproducible settings (one BLAS thread), so the scores are the same bits
    whatever the workers. Aligned copies (`CopyReader.is_aligned`) depend on every
    model's vocabulary at once: they are scored here, bypassing the cache.
    Scoring runs on `device` (mergekit's --device). Each copy moves `progress`
    one step (a plan's one bar, see `scoring_progress`; by default a bar of
    this call's own).
    """
    workers = workers or LocalWorkers(1)
    by_name = {tensor.name: tensor for tensor in tensors}
    copies = [
        (by_name[name], index, scoring.precision(precision))
        for (name, index), precision in wanted.items()
    ]
    scores: dict[Place, BoundedScore | None] = {}
    aligned = [copy for copy in copies if reader.is_aligned(copy[0])]
    jobs, places = [], []
    for tensor, index, precision in copies:
        if reader.is_aligned(tensor):
            continue
        model, stored = models[index], tensor.stored_names[index]
        known = model.content.known(stored)
        score = cache.get(known.hash, precision) if cache and known else None
        if score is not None:
            scores[tensor.name, index] = score
            continue
        header = model.headers[stored]
        where = f"model {model.name}: tensor {stored}"
        job = CopyJob(where, header, scoring.name, scoring.version, precision, device)
        jobs.append(replace(job, hub_file=model.hub_file(header.path)))
        places.append((tensor.name, index, stored))
    largest = max((working_set(job.header) for job in jobs), default=0)
    own = progress is None
    progress = scoring_progress(len(copies), quiet) if own else progress
    # Copies asked for beyond the total (a plan's refinements) extend it.
    progress.total = max(progress.total, progress.n + len(copies))
    progress.set_postfix_str(workers.describe(largest), refresh=False)
    progress.update(len(copies) - len(jobs) - len(aligned))  # cached: done
    with progress if own else nullcontext(), reproducible_scoring():
        if workers.in_process:
            function = partial(score_copy, scoring=scoring, shared=SharedScores(cache))
        else:  # results come back here, to be stored in the cache
            function = score_elsewhere
        # closing(): an error below stops the workers now, not when the
        # traceback holding this frame is freed.
        with closing(workers.run(function, jobs, largest)) as finished:
            for number, scored in finished:
                name, index, stored = places[number]
                job = jobs[number]
                models[index].content.record(stored, scored.digest)
                score = _checked(scored.score, nonfinite, job.where)
                if cache and scored.fresh and score is not None:
                    cache.put(scored.digest.hash, job.precision, score)
                scores[name, index] = score
                progress.update()
        for tensor in dict.fromkeys(tensor for tensor, _, _ in aligned):
            precisions = {i: p for t, i, p in aligned if t is tensor}
            for index, copy in enumerate(reader.copies(tensor)):
                if index in precisions:
                    stored = tensor.stored_names[index]
                    where = f"model {models[index].name}: tensor {stored}"
                    scores[tensor.name, index] = _score(
                        copy, scoring, precisions[index], device, nonfinite, where
                    )
                    progress.update()
    return scores


def _checked(
    score: BoundedScore | None, nonfinite: str, where: str
) -> BoundedScore | None:
    """A worker's score; None (a copy holding NaN or Inf) is refused unless
    `nonfinite` is "lose"."""
    if score is not None:
        return score
    if nonfinite != "lose":
        raise ModelError(
            f"{where} holds NaN or Inf values (set `nonfinite: lose` to let "
            "such copies lose instead)"
        )
    LOG.warning("%s holds NaN or Inf; it loses this tensor", where)
    return None


def _score(
    copy: torch.Tensor,
    scoring: Scoring,
    precision: Precision,
    device: str | None,
    nonfinite: str,
    where: str,
) -> BoundedScore | None:
    """One aligned copy's score; None for a non-finite copy when `nonfinite` is
    "lose"."""
    try:
        return scoring.score(copy.to(device) if device else copy, precision)
    except NonFiniteMatrixError:
        return _checked(None, nonfinite, where)


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
