"""Worker threads that run whole chunks of rows on the CPU, each with one intra-op thread.

Why: ATen runs each op on all intra-op threads in one OpenMP parallel region that ends at a barrier,
so a region lasts as long as its slowest thread. The chunked PyTorch path issues hundreds of small
ops per call; when another process shares a core, the thread on that core is descheduled for whole
time slices and every region it joins waits for it (8x slower in issue 13, against 2x for code
that issues a few large ops). Here ``T`` worker threads (``T`` = the caller's
``torch.get_num_threads()``) take whole chunks from a shared counter and run every op of a chunk
on one thread: no barrier per op, and a worker whose core is shared simply takes fewer chunks.

Thread settings: with ATen's OpenMP backend a parallel op called from another Python thread gets
an OpenMP team of that thread's own (libgomp keeps a thread pool per calling thread), so ``T``
Python threads calling ops with default settings oversubscribe ``T`` cores (up to ``T * T``
threads) and bring back the per-op barriers. Each worker therefore sets *its own* intra-op
thread count to 1 (``torch.set_num_threads`` writes OpenMP's per-thread ICV and MKL's thread-local
count; checked by ``tests/test_cpu_pool.py``). The same call also writes ATen's
process-wide default, which the thread that creates the pool restores at once; the pool is created
once per thread count and process, so the user's setting is left as it was.

Python runs each op's few microseconds of glue under the GIL, so beyond ``MAX_WORKERS`` workers the
GIL, not the cores, would set the pace: with more intra-op threads than that, ``MAX_WORKERS``
workers share them (``threads // MAX_WORKERS`` intra-op threads each).

``RQVAE_FAST_CPU_WORKERS``: ``0`` or ``1`` runs the chunks on the calling thread (ops use the
usual intra-op threads), ``n > 1`` forces ``n`` workers; unset, ``torch.get_num_threads()``
capped at ``MAX_WORKERS``.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

WORKERS_ENV = "RQVAE_FAST_CPU_WORKERS"
MAX_WORKERS = 8
_local = threading.local()  # ``in_worker`` is True on the pool's own threads
_pools: Dict[Tuple[int, int], "ChunkPool"] = {}
_pools_lock = threading.Lock()
_forced: Optional[int] = None  # set by :func:`use_workers`


class _Job:
    """``fn(i)`` for ``i`` in ``range(count)``, handed out one index at a time; the first error
    stops the hand-out and is re-raised by :meth:`ChunkPool.run`."""

    def __init__(self, count: int, fn: Callable[[int], None], runners: int):
        self.count, self.fn = count, fn
        self.next = 0
        self.runners = runners
        self.error: Optional[BaseException] = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        # The caller's inference mode, so workers may write into tensors it created.
        self.inference = torch.is_inference_mode_enabled()

    def _take(self) -> Optional[int]:
        with self.lock:
            if self.error is not None or self.next >= self.count:
                return None
            self.next += 1
            return self.next - 1

    def drain(self) -> None:
        try:
            while True:
                index = self._take()
                if index is None:
                    return
                try:
                    self.fn(index)
                except BaseException as exc:  # noqa: BLE001 (re-raised in the caller)
                    with self.lock:
                        if self.error is None:
                            self.error = exc
        finally:
            with self.lock:
                self.runners -= 1
                if self.runners == 0:
                    self.done.set()


class ChunkPool:
    """``size`` daemon threads with ``threads_each`` intra-op threads each; :meth:`run` spreads a
    job over them."""

    def __init__(self, size: int, threads_each: int = 1):
        self.size, self.threads_each = size, threads_each
        self.pid = os.getpid()
        self._tasks: "queue.SimpleQueue[Optional[_Job]]" = queue.SimpleQueue()
        caller_threads = torch.get_num_threads()
        ready = threading.Barrier(size + 1)
        self._threads = [threading.Thread(target=self._work, args=(ready,), daemon=True,
                                          name=f"rqvae_fast-cpu-{i}") for i in range(size)]
        for thread in self._threads:
            thread.start()
        ready.wait()
        torch.set_num_threads(caller_threads)  # the workers' set_num_threads also wrote the global default

    def _work(self, ready: threading.Barrier) -> None:
        _local.in_worker = True
        torch.get_num_threads()  # ATen's lazy per-thread init first, so it cannot undo the next line later
        torch.set_num_threads(self.threads_each)
        ready.wait()
        while True:
            job = self._tasks.get()
            if job is None:
                return
            with torch.inference_mode() if job.inference else torch.no_grad():
                job.drain()

    def run(self, count: int, fn: Callable[[int], None]) -> None:
        """Call ``fn(i)`` for every ``i < count`` on the workers; block until all are done."""
        job = _Job(count, fn, min(self.size, count))
        for _ in range(job.runners):
            self._tasks.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error

    def close(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)


def worker_count() -> int:
    """How many workers a chunked pass started from this thread would use (1 = no pool)."""
    if getattr(_local, "in_worker", False):
        return 1
    if _forced is not None:
        return _forced
    setting = os.environ.get(WORKERS_ENV, "").strip()
    if setting:
        try:
            return max(1, int(setting))
        except ValueError:
            raise ValueError(f"{WORKERS_ENV} must be an integer, got {setting!r}") from None
    return min(torch.get_num_threads(), MAX_WORKERS)


@contextlib.contextmanager
def use_workers(count: Optional[int]) -> Iterator[None]:
    """Within the block, chunked passes use ``count`` workers (1: none, ops on the calling thread
    with the usual intra-op threads; None: the default). Process-wide; for benchmarks and tests."""
    global _forced
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1 or None, got {count}")
    previous, _forced = _forced, count
    try:
        yield
    finally:
        _forced = previous


def get_pool(size: int) -> ChunkPool:
    """The process's pool of ``size`` workers, created on first use (and again after a fork or
    when the caller's thread count changed); each worker gets an equal share of the caller's
    intra-op threads, at least one."""
    key = (size, max(1, torch.get_num_threads() // size))
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None or pool.pid != os.getpid():
            for other in _pools.values():  # a job queued before the stop signal still runs
                other.close()
            _pools.clear()
            pool = _pools[key] = ChunkPool(*key)
        return pool


def run_chunks(count: int, fn: Callable[[int], None], *, device: torch.device) -> None:
    """Call ``fn(i)`` for ``i`` in ``range(count)``: on the pool for CPU work when it helps
    (more than one worker and more than one chunk), else in order on this thread."""
    workers = worker_count() if device.type == "cpu" else 1
    if workers > 1 and count > 1:
        get_pool(workers).run(count, fn)
        return
    for index in range(count):
        fn(index)


def run_on_one_thread(fn: Callable[[], object]) -> object:
    """``fn()`` on one worker thread of the pool (one intra-op thread), for a single op such as
    an eigendecomposition whose multi-threaded library code stalls on a shared machine; on the
    calling thread when the pool is off (one worker)."""
    result = []
    workers = worker_count()
    if workers > 1:
        get_pool(workers).run(1, lambda _: result.append(fn()))
        return result[0]
    return fn()


def _forget_pools_in_child() -> None:
    global _pools_lock
    _pools.clear()  # the threads did not survive the fork
    _pools_lock = threading.Lock()
_forced: Optional[int] = None  # set by :func:`use_workers`


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)
