"""Scoring on a Ray cluster: the jobs local workers run, as Ray tasks.

One task scores one model's copy of one tensor, so Ray balances the load and,
when a worker dies, runs that task again elsewhere. A task reads its copy at
the path the driver found (a shared folder) or, for a Hub model, fetches the
commit the driver resolved into the worker's own Hub cache. It returns the
copy's digest and score: the driver checks the digest against any it knows (the
worker must have read the very bytes planned) and stores the score in its own
cache. Tasks score at one thread each, as local workers do, so the map has the
same bytes as a local plan's on the same kind of CPU.

Ray is an optional extra (`pip install 'ner-merge[ray]'`); the cluster's
workers need ner-merge installed at the same version (each task checks).
"""

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from ner_merge.errors import NerMergeError

Job = TypeVar("Job")
Result = TypeVar("Result")

# Runs of a task whose worker died (Ray's count for system failures only: an
# error raised by the task itself is final).
TASK_RETRIES = 3

# How long a cluster's address may take to accept a connection.
CONNECT_SECONDS = 10


class RayWorkers:
    """The workers of the Ray cluster at `address` ("auto": the one this machine
    belongs to)."""

    in_process = False  # jobs and results travel between processes

    def __init__(self, address: str) -> None:
        """Connect now, so that a wrong address is said before any model is read;
        the connection lasts as long as this process."""
        self.address = address
        try:
            import ray
        except ImportError:
            raise NerMergeError(
                f"--ray {address}: Ray is not installed; install it with "
                "pip install 'ner-merge[ray]'"
            ) from None
        if not ray.is_initialized():
            self._connect(ray)

    def describe(self, working_set: int) -> str:
        return f"Ray cluster {self.address}"

    def run(
        self,
        function: Callable[[Job], Result],
        jobs: Sequence[Job],
        working_set: int = 0,
    ) -> Iterator[tuple[int, Result]]:
        """function(job) for every job as a Ray task, yielded as each finishes.

        `function` must be importable by the workers (a module's function).
        Closing the iterator early cancels the tasks not yet finished.
        """
        import ray

        task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(function)
        pending = {task.remote(job): index for index, job in enumerate(jobs)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for reference in done:
                    index = pending.pop(reference)
                    yield index, self._result(ray, reference, jobs[index])
        finally:
            for reference in pending:
                ray.cancel(reference)

    def _connect(self, ray) -> None:
        self._check_reachable()
        try:
            ray.init(
                address=self.address,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except Exception as error:  # ConnectionError, ValueError, RuntimeError
            reason = next(iter(str(error).strip().splitlines()), "")
            raise NerMergeError(
                f"--ray {self.address}: cannot connect to a Ray cluster there "
                f"({type(error).__name__}: {reason})"
            ) from None

    def _check_reachable(self) -> None:
        """Ray waits for an address that does not answer without end: a host:port
        address is tried here first, for CONNECT_SECONDS."""
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            return  # "auto", or a form Ray parses itself
        try:
            socket.create_connection((host, int(port)), CONNECT_SECONDS).close()
        except OSError as error:
            raise NerMergeError(
                f"--ray {self.address}: cannot connect to a Ray cluster there "
                f"({error.strerror or error})"
            ) from None

    @staticmethod
    def _result(ray, reference, job):
        """A task's result; its error as ours, naming the job where it is not."""
        try:
            return ray.get(reference)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, NerMergeError):
                raise error.cause from None
            where = getattr(job, "where", "a job")
            raise NerMergeError(
                f"{where}: failed on the Ray cluster "
                f"({type(error.cause).__name__}: {error.cause})"
            ) from None
        except ray.exceptions.RayError as error:  # retries spent, cluster lost
            where = getattr(job, "where", "a job")
            raise NerMergeError(
                f"{where}: the Ray cluster could not run it ({type(error).__name__})"
            ) from None


# What keeps a throwaway cluster on 127.0.0.1 and out of the user's home: Ray
# otherwise listens on the machine's interface address, and writes an auth
# token to ~/.ray. Every side (head, its workers, the driver) needs both.
LOOPBACK_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
}


@contextmanager
def loopback_cluster(workers: int, startup_seconds: float = 60) -> Iterator[str]:
    """A Ray cluster on this machine for tests and benchmarks: one head node with
    `workers` worker slots, listening on 127.0.0.1 only; yields its address.

    Ray allows no second node on loopback (the setting that keeps it there
    forbids joining), so the workers are the head's. Its folder is our own,
    and only what `ray start` started is stopped.
    """
    temp_dir = tempfile.mkdtemp(prefix="ner-ray-", dir="/tmp")  # short socket paths
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
        + [f"--port={port}", f"--num-cpus={workers}", f"--temp-dir={temp_dir}"]
        + ["--include-dashboard=false", "--disable-usage-stats"]
        + ["--object-store-memory=100000000"],
        env=dict(os.environ, **LOOPBACK_ENVIRONMENT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + startup_seconds
        while not _listening(port):
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start (see {temp_dir})")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()  # with --block, `ray start` stops what it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
