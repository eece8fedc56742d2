"""Files the engine writes."""

import contextlib
import os
from pathlib import Path


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
