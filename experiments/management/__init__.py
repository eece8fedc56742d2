"""The researchers' management commands (see commands/)."""


def bar_interval(stream) -> float:
    """Seconds between a command's progress-bar redraws: a terminal redraws in place, a log
    file or pipe gets a line each time, so there only a few."""
    return 0.1 if stream.isatty() else 30.0
