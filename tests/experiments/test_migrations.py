"""Data migrations: what an upgraded site's old rows become."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

pytestmark = pytest.mark.django_db(transaction=True)


def migrate(target: tuple[str, str]):
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([target])
    return executor.loader.project_state([target]).apps


def test_old_languages_become_the_sites_that_served_them_and_work_at_its_step_has_a_clock():
    before = ("experiments", "0010_system_generation")
    after = ("experiments", "0011_old_rows")
    apps = migrate(before)
    Collection, Study = (
        apps.get_model("experiments", "Collection"),
        apps.get_model("experiments", "Study"),
    )
    collection = Collection.objects.create(name="c")
    for slug, language in (("at", "de-AT"), ("de", "de"), ("fr", "fr"), ("en", "en")):
        Study.objects.create(name=slug, slug=slug, collection=collection, language=language)
    try:
        apps = migrate(after)
        stored = dict(
            apps.get_model("experiments", "Study").objects.values_list("slug", "language")
        )
        assert stored == {"at": "de", "de": "de", "fr": "en", "en": "en"}
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
