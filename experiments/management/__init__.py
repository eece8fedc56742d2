"""The researchers' management commands (see commands/)."""


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
