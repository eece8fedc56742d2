"""Feature extraction for a folder of media, in parallel processes, with per-file errors."""

from __future__ import annotations

import os
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.features import MediaError
from engine.features.audio import music_features
from engine.features.video import frame_features
from engine.processes import process_pool

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mkv", ".mov", ".webm", ".avi"}


def find_videos(folder) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)


def _init_worker():
    torch.set_num_threads(1)  # one process per core; no oversubscription


def extract_one(path, encoder="efficientnet-lite0", pretrained=True, image_size=None, device=None):
    """(frame features (T, D), music vector (1140,)) of one music video."""
    frames = frame_features(path, encoder, device, pretrained=pretrained, image_size=image_size)
    return frames, music_features(path)


def _safe(path, kwargs):
    try:
        return path, extract_one(path, **kwargs), None
    except MediaError as exc:
        return path, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
        return path, None, f"{path}: {type(exc).__name__}: {exc}"


def extract_folder(paths, workers: int | None = None, progress: bool = True, **kwargs):
    """Features of every path. Returns (keys, frames, music, errors); failed files are
    left out and listed in `errors` as (path, message)."""
    paths = [Path(p) for p in paths]
    workers = workers or os.cpu_count() or 1
    results, errors = {}, []
    bar = tqdm(total=len(paths), desc="extract", unit="file", disable=not progress)
    if workers > 1 and len(paths) > 1:
        with process_pool(workers, initializer=_init_worker) as pool:
            futures = [pool.submit(_safe, p, kwargs) for p in paths]
            for fut in as_completed(futures):
                _collect(fut.result(), results, errors)
                bar.update()
    else:
        for p in paths:
            _collect(_safe(p, kwargs), results, errors)
            bar.update()
    bar.close()
    keys = [p for p in paths if p in results]
    frames = [results[p][0] for p in keys]
    music = np.stack([results[p][1] for p in keys]) if keys else np.zeros((0, 1140), np.float32)
    return keys, frames, music, errors


def _collect(result, results, errors):
    path, value, error = result
    if error is None:
        results[path] = value
    else:
        errors.append((path, error))
