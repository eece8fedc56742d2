"""Files the engine reads and writes."""

import contextlib
import io
import os
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = {
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
    ".ogv",
}  # fmt: skip


def find_videos(folder) -> list[Path]:
    """Every video file under `folder`, sorted, hidden ones (a name or folder starting with
    a dot) aside."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in VIDEO_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


@contextlib.contextmanager
def written_whole(path):
    """A binary file that becomes `path` (exactly that name) only once it is complete: a
    write stopped halfway (Ctrl-C, a full disk) leaves whatever `path` held before."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            yield f
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def embeddings_npz(keys, video, music) -> bytes:
    """A system's embeddings as the platform stores them: an .npz of `keys` (pair keys) and
    the `video` and `music` rows in their order."""
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(keys), video=video, music=music)
    return buffer.getvalue()


def load_embeddings(file) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, video, music) of an `embeddings_npz` file (a path or an open binary file)."""
    with np.load(file) as data:
        return [str(key) for key in data["keys"]], data["video"], data["music"]
