"""Threads: how many a process computes with (torch, onnxruntime, FAISS and NumPy's BLAS), a pipeline stage that runs
an iterator ahead of its consumer in a background thread, so that decoding, the backbone and what follows overlap,
and a work loop split over the compute threads.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import threadpoolctl
import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_THREADS = 1024
"""The most threads a setting may ask for."""

_state = {"count": 0}
"""The thread count set by :func:`set_threads` (0: not set; torch's own default stands)."""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def auto_threads(workers: int = 0, pipelined: bool = True) -> int:
    """The measured best compute thread count: this process's share of the usable cores (under torchrun, the cores
    over the processes on this node, ``LOCAL_WORLD_SIZE``), less one per decoding worker process (the workers need
    their cores), at least one; for ``pipelined`` work (decoding and a network's forward pass in threads of their
    own) on two cores or fewer, one.

    On a 2-core machine a second OpenMP thread contends with the pipeline's decoding thread and with other
    processes: a parallel op waits for its slowest thread, and ``benchmarks/locate_throughput.py`` measured one
    thread best there. Building an index from cached features has no such stage, and
    ``benchmarks/gallery_search.py`` measured it faster with both cores.
    """
    cores = usable_cores() // max(1, _local_processes())
    if pipelined and cores <= 2:
        return 1
    return max(1, cores - max(0, workers))


def _local_processes() -> int:
    """The processes of this job on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def set_threads(count: int, workers: int = 0, pipelined: bool = True) -> int:
    """Set the compute threads of this process: torch's intra-op pool, the onnxruntime sessions made afterwards
    (they follow torch's count), FAISS's OpenMP pool (now if FAISS is loaded, else when geoswc loads it), NumPy's
    BLAS and :func:`each`'s workers. ``count`` 0: :func:`auto_threads` for ``workers`` decoding processes and
    (``pipelined``) decoding and inference in threads of their own. Returns the count set."""
    n = count if count > 0 else auto_threads(workers, pipelined)
    n = min(n, MAX_THREADS)
    _state["count"] = n
    threadpoolctl.threadpool_limits(n, user_api="blas")  # process-wide, unlike OpenMP's count
    in_this_thread()
    log.debug("compute threads: %d", n)
    return n


def in_this_thread() -> None:
    """Give the calling thread the process's compute thread count. OpenMP keeps the count per thread: a thread
    started after :func:`set_threads` (a pipeline stage, a web server's worker) would otherwise run BLAS and FAISS
    with OpenMP's default, one thread per core, whatever torch reports."""
    n = _count()
    torch.set_num_threads(n)
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(n)


def _count() -> int:
    """The process's compute thread count: as :func:`set_threads` set it, else torch's."""
    return _state["count"] or torch.get_num_threads()


def threads_set() -> int:
    """The count :func:`set_threads` set (0: never called in this process)."""
    return _state["count"]


def each(work: Callable[[T], None], items: Iterable[T]) -> None:
    """``work(item)`` for every item, split over the process's compute threads (as set, else torch's count), each
    computing with one thread of its own (BLAS and FAISS), for work that releases the GIL (NumPy, FAISS). An
    exception is raised here; with one thread or one item, everything runs in the calling thread."""
    todo = list(items)
    n = min(len(todo), _count())
    if n <= 1:
        for item in todo:
            work(item)
        return

    def one(item: T) -> None:
        faiss = sys.modules.get("faiss")
        if faiss is not None:
            faiss.omp_set_num_threads(1)  # this thread's own OpenMP count
        work(item)

    with threadpoolctl.threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(n, "geoswc-each") as pool:
        for _ in pool.map(one, todo):
            pass


_DONE = object()


def ahead(items: Iterable[T], depth: int = 2, name: str = "geoswc-ahead") -> Iterator[T]:
    """``items``, iterated in a background thread up to ``depth`` items ahead of the consumer: the producer's work
    (decoding, a network's forward pass: both release the GIL) overlaps the consumer's. An exception the producer
    raises is raised here, in order; closing this iterator stops the producer and closes ``items``."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        in_this_thread()
        it = iter(items)
        try:
            for x in it:
                if not put((x, None)):
                    return
            put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put((None, e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is _DONE:
                return
            yield x
    finally:
        stop.set()
        worker.join()
