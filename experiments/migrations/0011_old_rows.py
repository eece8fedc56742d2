"""Rows an upgraded site kept from before: made what the current code expects."""

from django.conf import settings
from django.db import migrations
from django.utils import timezone
from django.utils.translation import get_supported_language_variant


def supported_languages(apps, schema_editor):
    """A language stored before it became a choice (free text: `de-AT`) is the site's one
    that served its pages (`de`), or the default: an admin form would else show none chosen
    and save its first choice."""
    Study = apps.get_model("experiments", "Study")
    codes = [code for code, _ in settings.LANGUAGES]
    for study in Study.objects.exclude(language__in=codes):
        try:
            study.language = get_supported_language_variant(study.language.lower())
        except LookupError:
            study.language = settings.LANGUAGE_CODE
        study.save(update_fields=["language"])


def progress_clocks(apps, schema_editor):
    """Work at its step when the site was upgraded (its workers stopped for it) gets a last
    report time, so the admin shows how long it has been quiet."""
    now = timezone.now()
    for model, busy in (("Study", "preparing"), ("System", "running")):
        rows = apps.get_model("experiments", model).objects
        rows.filter(status=busy, progress_at__isnull=True).update(progress_at=now)


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0010_system_generation"),
    ]

    operations = [
        migrations.RunPython(supported_languages, migrations.RunPython.noop),
        migrations.RunPython(progress_clocks, migrations.RunPython.noop),
    ]
