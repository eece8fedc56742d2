"""Process pools for the engine's parallel work."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int, initializer=None) -> ProcessPoolExecutor:
    """A pool whose workers start from a fresh fork server, never from this process.

    A process that has already run torch's CPU kernels holds OpenMP thread pools that a
    forked child cannot use: torch work in such a child hangs. Test runners, Celery workers
    and notebooks are such processes, so every pool that runs torch comes from here.
    """
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=initializer)
