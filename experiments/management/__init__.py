"""The researchers' management commands (see commands/)."""

import contextlib
import io
import os
from pathlib import Path


def bar_interval(stream) -> float:
    """Seconds between a command's progress-bar redraws: a terminal redraws in place, a log
    file or pipe gets a line each time, so there only a few."""
    return 0.1 if stream.isatty() else 30.0


def study_named(ref: str):
    """The study a command's argument names (slug or id), or a CommandError that says so."""
    from django.core.management.base import CommandError

    from analysis.load import get_study
    from experiments.models import Study

    try:
        return get_study(ref)
    except Study.DoesNotExist:
        raise CommandError(f"No study with slug or id {ref!r}.") from None


def check_output(path: Path, option: str) -> None:
    """CommandError, before any work, when the file `path` given by `option` cannot be written:
    its folder missing or not a folder, the path a folder, or no permission to write (the
    folder too: `output_file` writes beside the file first)."""
    from django.core.management.base import CommandError

    path = Path(path)
    folder = path.parent
    if not folder.exists():
        problem = f"the folder {folder} does not exist"
    elif not folder.is_dir():
        problem = f"{folder} is not a folder"
    elif path.is_dir():
        problem = "it is a folder; give a file name"
    elif not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        problem = "no permission to write it"
    else:
        return
    raise CommandError(f"{option} {path}: {problem}.")


@contextlib.contextmanager
def output_file(path: Path, option: str, binary: bool = False):
    """The file `path` (given by `option`) open for writing (UTF-8 text, or bytes): it
    replaces `path` only once written whole, so a full disk or an error halfway leaves the
    previous file as it was and nothing beside it. An OSError is a CommandError saying so."""
    from django.core.management.base import CommandError

    from engine.files import written_whole

    try:
        with written_whole(path) as f:
            if binary:
                yield f
                return
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            try:
                yield text
            finally:
                text.detach()  # flushed into `f`, which stays written_whole's to close
    except OSError as error:
        raise CommandError(
            f"{option} {path}: cannot write it ({error.strerror or error})."
        ) from None
