"""Where scores are computed: in this process, by one or more worker threads.

A score must not depend on where or beside what it was computed, or a map would
change with the machine's core count: BLAS and LAPACK sum in an order that
depends on their thread count, and the same matrix scored with 1 and 2 threads
differed in its last bit for 41 of 87 matrices here. So every score is computed
by one thread (`reproducible_scoring`), and parallelism comes from scoring
whole tensors side by side: N workers give the very bytes one worker gives.

Threads suffice because the work happens in BLAS, LAPACK, torch and file reads,
which all release the GIL; they share the score cache and the content index
without any copy, and each holds one tensor and its float64 working set, so
memory grows by one such set per worker.

`ner_merge.scoring.cluster` runs the same jobs on a Ray cluster, with the same
interface: `run(function, jobs)` yields `(index, result)` pairs in the order jobs
finish.
"""

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Protocol, TypeVar

import psutil

from ner_merge.errors import NerMergeError

LOG = logging.getLogger(__name__)

Job = TypeVar("Job")
Result = TypeVar("Result")

# The environment variables that choose the workers where no option can:
# a plan run by `mergekit-yaml`.
WORKERS_VARIABLE = "NER_MERGE_WORKERS"
RAY_VARIABLE = "NER_MERGE_RAY"

# Share of the available memory the default worker count may plan to use.
MEMORY_SHARE = 0.5


class Workers(Protocol):
    """What runs scoring jobs: `LocalWorkers`, or
    `ner_merge.scoring.cluster.RayWorkers`."""

    in_process: bool  # jobs may share objects with the caller (the cache)

    def describe(self, working_set: int) -> str:
        """A few words for the progress bar."""

    def run(
        self, function: Callable[[Job], Result], jobs: Sequence[Job], working_set: int
    ) -> Iterator[tuple[int, Result]]:
        """function(job) for every job, yielded as `(index, result)` as each
        finishes; jobs not yet started are cancelled when the caller stops."""


@contextmanager
def reproducible_scoring() -> Iterator[None]:
    """BLAS, LAPACK and torch each use one thread inside this block, and float32
    products run at full float32 precision (never TF32 on a GPU, which the float32
    route's error bound does not allow for).

    The settings are process-wide, so the block wraps the whole scoring phase,
    not each score: worker threads started inside it inherit them.
    """
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    matmul = torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(matmul)


class LocalWorkers:
    """`count` threads of this process, each scoring one tensor at a time; None
    chooses the count from the cores and memory (`default_count`)."""

    in_process = True

    def __init__(self, count: int | None = None) -> None:
        self.count = count

    def describe(self, working_set: int) -> str:
        count = self.count or default_count(working_set)
        return f"{count} worker{'s' if count > 1 else ''}"

    def run(
        self,
        function: Callable[[Job], Result],
        jobs: Sequence[Job],
        working_set: int = 0,
    ) -> Iterator[tuple[int, Result]]:
        """function(job) for every job, yielded as each finishes.

        `working_set` is the most bytes one job may hold, which bounds the default
        count. Closing the iterator early (an error in the caller) cancels the
        jobs not yet started; those running finish first.
        """
        count = min(self.count or default_count(working_set), max(len(jobs), 1))
        if self.count and count * working_set > available_memory():
            LOG.warning(
                "%d workers may hold %.1f GB at once, more than the %.1f GB "
                "available: fewer workers (or none given: as many as fit) avoid "
                "running out of memory",
                count,
                count * working_set / 1e9,
                available_memory() / 1e9,
            )
        if count == 1:  # no thread to start: the caller's own, in order
            yield from ((index, function(job)) for index, job in enumerate(jobs))
            return
        with ThreadPoolExecutor(count, thread_name_prefix="ner-score") as pool:
            pending = {
                pool.submit(function, job): index for index, job in enumerate(jobs)
            }
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield pending.pop(future), future.result()
            finally:
                for future in pending:
                    future.cancel()


def default_count(working_set: int) -> int:
    """As many workers as usable cores, fewer if their working sets would take
    more than MEMORY_SHARE of the available memory; at least one."""
    if hasattr(os, "sched_getaffinity"):  # the cores this process may use
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    if working_set <= 0:
        return max(cores, 1)
    by_memory = int(available_memory() * MEMORY_SHARE) // working_set
    return max(1, min(cores, by_memory))


def available_memory() -> int:
    """Bytes of memory available to new work without swapping: free memory plus
    the caches the system can drop (psutil's figure, on every platform)."""
    return psutil.virtual_memory().available


def choose_workers(count: int | None = None, ray_address: str | None = None) -> Workers:
    """The workers a plan uses: those the options ask for (`--workers`, `--ray`),
    else $NER_MERGE_WORKERS or $NER_MERGE_RAY, else local workers as many as
    `default_count` allows. Asking for both kinds at once is refused."""
    if count is None and ray_address is None:
        count, ray_address = _count_variable(), os.environ.get(RAY_VARIABLE) or None
        workers_given, ray_given = f"${WORKERS_VARIABLE}", f"${RAY_VARIABLE}"
    else:
        workers_given, ray_given = "--workers", "--ray"
    if ray_address is not None and not ray_address.strip():
        raise NerMergeError(f"{ray_given} is empty: give HOST:PORT, or auto")
    if count is not None and ray_address:
        raise NerMergeError(
            f"{workers_given} and {ray_given}: choose local workers or a Ray "
            "cluster, not both (a cluster's size is its own)"
        )
    if ray_address:
        from ner_merge.scoring.cluster import RayWorkers

        return RayWorkers(ray_address, given_as=ray_given)
    return LocalWorkers(count)


def _count_variable() -> int | None:
    """$NER_MERGE_WORKERS as a count, None where unset."""
    value = os.environ.get(WORKERS_VARIABLE, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise NerMergeError(
            f"${WORKERS_VARIABLE}={value!r}: give a number of workers, 1 or more"
        )
    return int(value)
