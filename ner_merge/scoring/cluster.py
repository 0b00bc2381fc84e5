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

import importlib.util
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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

# How long a cluster's address may take to accept a TCP connection, and Ray to
# connect to the cluster there.
PROBE_SECONDS = 10
CONNECT_SECONDS = 60


class RayWorkers:
    """The workers of the Ray cluster at `address` ("auto": the one this machine
    belongs to)."""

    in_process = False  # jobs and results travel between processes

    def __init__(self, address: str, given_as: str = "--ray") -> None:
        """Connect now, so that a wrong address is said before any model is read;
        the connection lasts as long as this process. `given_as` names where
        the address came from, for messages."""
        self.address = address
        self.named = f"{given_as}{' ' if given_as.startswith('-') else '='}{address}"
        if importlib.util.find_spec("ray") is None:
            raise NerMergeError(
                f"{self.named}: Ray is not installed; install it with "
                "pip install 'ner-merge[ray]'"
            )
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if host and port.isdigit():
            self._check_reachable(host, int(port))
        import ray

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
        """ray.init, for at most CONNECT_SECONDS: Ray itself waits for a cluster
        it cannot reach without end."""
        failure: list[BaseException] = []

        def connect() -> None:
            try:
                ray.init(
                    address=self.address,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
            except Exception as error:  # ConnectionError, ValueError, RuntimeError
                failure.append(error)

        # Ray warns that a driver started off the main thread sets no SIGTERM
        # handler; this one needs none.
        logging.getLogger("ray._private.worker").addFilter(
            lambda record: "SIGTERM handler" not in record.getMessage()
        )
        connecting = threading.Thread(target=connect, daemon=True)
        connecting.start()
        connecting.join(CONNECT_SECONDS)
        if connecting.is_alive():
            raise NerMergeError(
                f"{self.named}: no Ray cluster answered within {CONNECT_SECONDS} s"
            )
        if failure:
            error = failure[0]
            reason = next(iter(str(error).strip().splitlines()), "")
            raise NerMergeError(
                f"{self.named}: cannot connect to a Ray cluster there "
                f"({type(error).__name__}: {reason})"
            )

    def _check_reachable(self, host: str, port: int) -> None:
        """Refuse an address where nothing listens, and keep Ray on loopback for a
        cluster that listens there only.

        Ray replaces a loopback address by this machine's own address, where a
        cluster started with `--node-ip-address 127.0.0.1` does not listen; it
        keeps loopback only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which is
        read when Ray is imported, so it is set (unless the user set it) here.
        """
        reason = _unreachable(host, port)
        if reason:
            raise NerMergeError(
                f"{self.named}: cannot connect to a Ray cluster there ({reason})"
            )
        if _is_loopback(host):
            elsewhere = _this_machines_address()
            if elsewhere is None or _unreachable(elsewhere, port):
                os.environ.setdefault(LOOPBACK_ONLY, "0")

    @staticmethod
    def _result(ray, reference, job):
        """A task's result; its error as ours, naming the job where it is not."""
        where = getattr(job, "where", "a job")
        try:
            return ray.get(reference)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, NerMergeError):
                raise error.cause from None
            raise NerMergeError(
                f"{where}: failed on the Ray cluster "
                f"({type(error.cause).__name__}: {error.cause})"
            ) from None
        except ray.exceptions.RayError as error:  # retries spent, cluster lost
            raise NerMergeError(
                f"{where}: the Ray cluster could not run it ({type(error).__name__})"
            ) from None


# What keeps a throwaway cluster on 127.0.0.1 and out of the user's home: Ray
# otherwise listens on the machine's interface address, and writes an auth
# token to ~/.ray. The head needs both; a driver needs only LOOPBACK_ONLY, which
# RayWorkers sets itself for such a cluster.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_ENVIRONMENT = {LOOPBACK_ONLY: "0", "RAY_AUTH_MODE": "disabled"}


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
        while _unreachable("127.0.0.1", port):
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


def _unreachable(host: str, port: int) -> str | None:
    """Why nothing accepts TCP connections at host:port; None when something does."""
    try:
        socket.create_connection((host, port), PROBE_SECONDS).close()
    except OSError as error:
        return error.strerror or str(error)
    return None


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _this_machines_address() -> str | None:
    """The address this machine reaches others from, as Ray finds it (a UDP
    socket's connect sends nothing); None without a network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("8.8.8.8", 53))
            return probe.getsockname()[0]
        except OSError:
            return None
