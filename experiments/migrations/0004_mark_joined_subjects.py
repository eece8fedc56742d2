"""Subjects made by the join link before it marked them (`meta["joined"]`) are marked now, so
the join cap still counts them. Until then only their entry parameters told them apart; a
subject of a personal link who visited with such parameters is counted too, as the cap did."""

from django.db import migrations


def mark_joined(apps, schema_editor):
    Subject = apps.get_model("experiments", "Subject")
    for subject in Subject.objects.filter(meta__has_key="entry").exclude(meta__has_key="joined"):
        subject.meta["joined"] = True
        subject.save(update_fields=["meta"])


class Migration(migrations.Migration):
    dependencies = [("experiments", "0003_validated_label_and_threshold")]
    operations = [migrations.RunPython(mark_joined, migrations.RunPython.noop)]
