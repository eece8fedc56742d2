"""Process pools for the engine's parallel work."""

import contextlib
import ctypes
import functools
import math
import multiprocessing
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import threadpoolctl
import torch

_shared: dict[int, ProcessPoolExecutor] = {}
_shared_lock = threading.Lock()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool whose workers start from a fresh fork server, never from this process, and
    compute on one thread each (torch's and the BLAS numpy calls): the engine runs one
    process per core, and more threads would only compete for the cores.

    A process that has already run torch's CPU kernels holds OpenMP thread pools that a
    forked child cannot use: torch work in such a child hangs. Test runners, Celery workers
    and notebooks are such processes, so every pool that runs torch comes from here.
    """
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),)
    )


def _start_worker(owner: int) -> None:
    _exit_with(owner)
    keep_freed_memory()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"  # for the libraries a job loads later (scipy's own BLAS)
    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)  # those loaded already


def _exit_with(owner: int) -> None:
    """End this process as soon as process `owner` ends, however it ends.

    A pool's workers outlive an owner killed outright (SIGKILL, the OOM killer, a crash):
    each waits for work forever, holding its memory (torch, librosa: hundreds of MB), the
    fork server, and the owner's shared memory blocks, which the resource tracker unlinks
    only once every worker is gone. Linux ≥ 5.3 (a pidfd); elsewhere nothing is watched.
    """
    try:
        pidfd = os.pidfd_open(owner)
    except ProcessLookupError:  # gone already
        os._exit(1)
    except (AttributeError, OSError):
        return

    def wait():
        select.select([pidfd], [], [])  # readable once the owner has ended
        os._exit(1)

    threading.Thread(target=wait, name="exit-with-owner", daemon=True).start()


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


def shared_pool(workers: int) -> ProcessPoolExecutor:
    """A `process_pool` kept for the life of this process, one per number of workers.

    Starting a worker costs seconds (importing torch and librosa, building filter banks)
    against a fraction of a second per track, so callers that come back with more work (a
    Celery worker, a benchmark, a loop over batches) reuse the workers. Do not shut it
    down; `using_shared_pool` drops it when a worker dies, so the next call starts afresh.
    """
    with _shared_lock:
        pool = _shared.get(workers)
        if pool is None:
            pool = _shared[workers] = process_pool(workers)
        return pool


def discard_shared_pool(pool: ProcessPoolExecutor) -> None:
    """Forget (and shut down) a shared pool, e.g. one broken by a killed worker."""
    with _shared_lock:
        for key, value in list(_shared.items()):
            if value is pool:
                del _shared[key]
    pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def using_shared_pool(workers: int):
    """`shared_pool` for a block; dropped if a worker died under it (FFmpeg crashed, say)."""
    pool = shared_pool(workers)
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


SHARED_MEMORY_DIR = "/dev/shm"  # where Linux keeps shared memory (a container's may be small)


def batches_computed_ahead(
    fn: Callable, items: Sequence, workers: int, batch_size: int, shape: tuple, dtype=np.float32
) -> Iterator[tuple[int, np.ndarray]]:
    """`(start, results)` for each `batch_size` consecutive items: `fn(item)` of each, stacked
    into one array, computed by the shared pool of `workers` processes up to three batches
    ahead, for an `fn` whose results all have one `shape` and `dtype` (a music excerpt).

    The workers write results into shared memory instead of pickling them through the pool's
    single result pipe, which this process reads on one thread: a 1.4 MB excerpt costs it
    2.0-2.2 ms through the pipe (a ceiling of a few hundred a second, however many workers)
    and 0.65-0.8 ms from shared memory. Where shared memory is too small for that (a
    container's default 64 MB) the pipe serves instead; the results are the same.
    """
    ahead = 3 * batch_size
    slot = math.prod(shape) * np.dtype(dtype).itemsize  # bytes
    memory = _shared_memory(ahead * slot)
    if memory is None:
        results = computed_ahead(fn, items, workers, ahead)
    else:
        path = os.path.join(SHARED_MEMORY_DIR, memory.name)
        write = functools.partial(_write_at, fn, path, shape, dtype)
        jobs = ((item, i % ahead * slot) for i, item in enumerate(items))
        results = computed_ahead(write, jobs, workers, ahead)
    try:
        for start in range(0, len(items), batch_size):
            batch = np.empty((min(batch_size, len(items) - start), *shape), dtype)
            for row in batch:
                result = next(results)
                if memory is None:
                    row[...] = result
                else:  # copied now, as bytes (no view outlives it): item i + ahead comes next
                    row.data.cast("B")[:] = memory.buf[result : result + slot]
            yield start, batch
    finally:
        results.close()  # stopped early: pending work is cancelled
        if memory is not None:
            memory.close()
            memory.unlink()


def _shared_memory(size: int) -> SharedMemory | None:
    """A new block of shared memory with its pages reserved, or None where there is no room
    for it (a container's /dev/shm is 64 MB by default: writing into a page that cannot be
    had kills a process with SIGBUS)."""
    try:
        memory = SharedMemory(create=True, size=size)
    except OSError:
        return None
    try:
        fd = os.open(os.path.join(SHARED_MEMORY_DIR, memory.name), os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError:  # no room, or not where Linux keeps it
        memory.close()
        memory.unlink()
        return None
    return memory


def _write_at(fn: Callable, path: str, shape: tuple, dtype, job) -> int:
    """In a worker: `fn(item)` written at `offset` of the shared memory's file `path`, without
    mapping it: nothing of the block stays with the worker after the call."""
    item, offset = job
    result = np.ascontiguousarray(fn(item), dtype)
    if result.shape != shape:
        raise ValueError(f"the result for {item!r} has shape {result.shape}, not {shape}")
    data = memoryview(result).cast("B")
    fd = os.open(path, os.O_WRONLY)
    try:
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
    finally:
        os.close(fd)
    return offset
