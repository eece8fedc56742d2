"""Process pools for the engine's parallel work."""

import contextlib
import ctypes
import multiprocessing
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

_shared: dict[tuple, ProcessPoolExecutor] = {}
_shared_lock = threading.Lock()


def process_pool(workers: int, initializer=None) -> ProcessPoolExecutor:
    """A pool whose workers start from a fresh fork server, never from this process.

    A process that has already run torch's CPU kernels holds OpenMP thread pools that a
    forked child cannot use: torch work in such a child hangs. Test runners, Celery workers
    and notebooks are such processes, so every pool that runs torch comes from here.
    """
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(initializer,)
    )


def _start_worker(initializer) -> None:
    keep_freed_memory()
    if initializer is not None:
        initializer()


def keep_freed_memory() -> None:
    """Make glibc keep freed blocks of up to 32 MiB in the heap for the next allocation.

    By default every block over 128 KiB is mapped for the allocation and unmapped when freed,
    so a worker's large temporaries (a track's spectrograms, a batch of frames) fault their
    pages in afresh each time: 7-10% of a music worker's CPU time, most of it in the kernel.
    A worker's resident memory then stays near its peak. Nothing happens without glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    mallopt(m_trim_threshold, 1 << 30)


def shared_pool(workers: int, initializer=None) -> ProcessPoolExecutor:
    """A `process_pool` kept for the life of this process, one per (workers, initializer).

    Starting a worker costs seconds (importing torch and librosa, building filter banks)
    against a fraction of a second per track, so callers that come back with more work (a
    Celery worker, a benchmark, a loop over batches) reuse the workers. Do not shut it
    down; `using_shared_pool` drops it when a worker dies, so the next call starts afresh.
    """
    with _shared_lock:
        pool = _shared.get((workers, initializer))
        if pool is None:
            pool = _shared[workers, initializer] = process_pool(workers, initializer)
        return pool


def discard_shared_pool(pool: ProcessPoolExecutor) -> None:
    """Forget (and shut down) a shared pool, e.g. one broken by a killed worker."""
    with _shared_lock:
        for key, value in list(_shared.items()):
            if value is pool:
                del _shared[key]
    pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def using_shared_pool(workers: int, initializer=None):
    """`shared_pool` for a block; dropped if a worker died under it (FFmpeg crashed, say)."""
    pool = shared_pool(workers, initializer)
    try:
        yield pool
    except BrokenProcessPool:
        discard_shared_pool(pool)
        raise


def computed_ahead(fn: Callable, items: Iterable, workers: int, ahead: int) -> Iterator:
    """`fn(item)` of each item, in order, computed by the shared pool of `workers` processes
    at most `ahead` items in advance (so memory stays bounded). The pool outlives the
    iteration; work left when it stops early is cancelled."""
    pending: deque = deque()
    try:
        with using_shared_pool(workers) as pool:
            for item in items:
                if len(pending) >= ahead:
                    yield pending.popleft().result()
                pending.append(pool.submit(fn, item))
            while pending:
                yield pending.popleft().result()
    finally:  # leave the pool no work nobody will collect
        for future in pending:
            future.cancel()
