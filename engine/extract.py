"""Feature extraction for a folder of media, in parallel processes, with per-file errors."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from engine.devices import best_device
from engine.features import MediaError
from engine.features.audio import N_FEATURES, music_features, warm_numba_cache
from engine.features.audio_batch import music_features_batch
from engine.features.video import frame_features, frame_features_batch
from engine.processes import process_pool

# Files per step on an accelerator: the progress bar moves per step, and a step whose music
# batch fails is split in halves until the bad files are found (each costs ~2 steps' decode).
DEVICE_STEP = 2048
# How often a long extraction saves what it has, to go on from there if it is stopped.
SAVE_EVERY_S = 600


def extract_one(path, encoder="efficientnet-lite0", pretrained=True, image_size=None, device=None):
    """(frame features (T, D), music vector (1140,)) of one music video."""
    frames = frame_features(path, encoder, device, pretrained=pretrained, image_size=image_size)
    return frames, music_features(path)


def _safe(path, kwargs):
    try:
        return path, extract_one(path, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
        return path, None, _message(path, exc)


def _message(path, exc: Exception) -> str:
    return str(exc) if isinstance(exc, MediaError) else f"{path}: {type(exc).__name__}: {exc}"


def extract_folder(paths, workers: int | None = None, progress: bool = True, done=None, save=None,
                   **kwargs):  # fmt: skip
    """Features of every path. Returns (keys, frames, music, errors); failed files are
    left out and listed in `errors` as (path, message).

    On a CUDA device (`device`, or the default when there is one) frames and music are
    computed in large batches on the device, decoded by `workers` CPU processes; on the CPU
    each file is one task of a pool of `workers` processes.

    `done` maps paths extracted before to their (frames, music): they are kept, not extracted
    again. `save(keys, frames, music)`, when given, is called with everything extracted so
    far now and then (see `SAVE_EVERY_S`) and when the run is interrupted (Ctrl-C), before
    the interruption goes on: a long run stopped loses only the files in flight."""
    paths = [Path(p) for p in paths]
    workers = workers or os.cpu_count() or 1
    results, errors = {p: done[p] for p in paths if p in (done or {})}, []
    todo = [p for p in paths if p not in results]
    bar = tqdm(total=len(paths), initial=len(results), desc="extract", unit="file",
               disable=not progress)  # fmt: skip

    def save_all():
        if save and results:  # nothing yet (every file so far failed): nothing to write
            save(*_rows(paths, results))

    saves = _Saves(save_all)
    try:
        for result in _extracted(todo, workers, kwargs):
            _collect(result, results, errors, bar)
            saves.now_and_then()
    except KeyboardInterrupt:
        saves.now()
        raise
    finally:
        bar.close()
    return (*_rows(paths, results), errors)


def _extracted(paths, workers, kwargs):
    """(path, value, error) of every path, each as soon as it is known."""
    if best_device(kwargs.get("device")).type == "cuda":
        for start in range(0, len(paths), DEVICE_STEP):
            yield from _extract_batch(paths[start : start + DEVICE_STEP], workers, **kwargs)
    elif workers > 1 and len(paths) > 1:
        warm_numba_cache()  # the workers then read numba's cache instead of racing to write it
        yield from in_processes(paths, workers, functools.partial(_safe, kwargs=kwargs))
    else:
        for p in paths:
            yield _safe(p, kwargs)


def _rows(paths, results):
    keys = [p for p in paths if p in results]
    frames = [results[p][0] for p in keys]
    music = (
        np.stack([results[p][1] for p in keys]) if keys else np.zeros((0, N_FEATURES), np.float32)
    )
    return keys, frames, music


class _Saves:
    """Calls `save` every `SAVE_EVERY_S` seconds, or less often where saving is slow (each
    save writes everything so far): saving never takes more than a tenth of the time."""

    def __init__(self, save):
        self.save, self.last, self.took = save, time.monotonic(), 0.0

    def now_and_then(self):
        if time.monotonic() - self.last > max(SAVE_EVERY_S, 10 * self.took):
            self.now()

    def now(self):
        start = time.monotonic()
        self.save()
        self.last = time.monotonic()
        self.took = self.last - start


def in_processes(paths, workers: int, work):
    """`work(path)` of every path, as (path, value, error), in `workers` processes, each given
    one file at a time. A worker that dies (killed, the OOM killer, a crash inside FFmpeg)
    costs only the files in flight: each is then tried alone, in a process of its own, and
    one that kills that too is reported; the rest go on in a fresh pool."""
    todo = deque(paths)
    while todo:
        suspects = []
        with process_pool(min(workers, len(todo))) as pool:
            running = {}
            while todo or running:
                while todo and len(running) < workers:
                    path = todo.popleft()
                    running[pool.submit(work, path)] = path
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                if any(isinstance(future.exception(), BrokenProcessPool) for future in done):
                    for future, path in running.items():  # those done first still count
                        if future.done() and future.exception() is None:
                            yield future.result()
                        else:
                            suspects.append(path)
                    break
                for future in done:
                    del running[future]
                    yield future.result()
        for path in suspects:
            with process_pool(1) as alone:
                try:
                    yield alone.submit(work, path).result()
                except BrokenProcessPool:
                    yield path, None, f"{path}: the process extracting it died (killed, or a crash)"


def _extract_batch(
    paths, workers, encoder="efficientnet-lite0", pretrained=True, image_size=None, device=None
):
    """(path, (frames, music) or None, error or None) of every path, batched on `device`."""

    def frames(part):
        found = frame_features_batch(
            part, encoder, device, workers=workers, image_size=image_size, pretrained=pretrained
        )
        return [str(f) if isinstance(f, MediaError) else f for f in found]

    rows = bisected(frames, paths)
    failed = [(p, None, f) for p, f in zip(paths, rows, strict=True) if isinstance(f, str)]
    ok = [(p, f) for p, f in zip(paths, rows, strict=True) if not isinstance(f, str)]
    music = bisected(
        lambda part: list(music_features_batch(part, device, workers=workers)),
        [p for p, _ in ok],
    )
    done = [
        (p, None, row) if isinstance(row, str) else (p, (f, row), None)
        for (p, f), row in zip(ok, music, strict=True)
    ]
    return failed + done


def bisected(compute, paths) -> list:
    """`compute(paths)` (a list with one result per path), or, where it raises (a bad file
    that fails the batch, a decode process that died), that of each half, down to single
    files, whose error message stands for their result. The others go on."""
    if not paths:
        return []
    try:
        return compute(paths)
    except Exception as exc:  # noqa: BLE001 - find the bad file; the others go on
        if len(paths) == 1:
            return [_message(paths[0], exc)]
        half = len(paths) // 2
        return bisected(compute, paths[:half]) + bisected(compute, paths[half:])


def _collect(result, results, errors, bar):
    path, value, error = result
    if error is None:
        results[path] = value
    else:
        errors.append((path, error))
        if not bar.disable:  # as it happens, above the bar: a long run's failures show early
            bar.write(f"FAILED {error}", file=sys.stderr)
    bar.update()  # after: a run stopped once the bar shows a file has that file's rows to save
