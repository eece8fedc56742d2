"""Creating subjects: each gets the next ordinal and its question plan, stored as rows.

Everything a participant's pages need is written here, once, from the database: the study's
test pairs, its systems' stored search results and embeddings. Neither the engine nor the
broker is called, so creating a subject (from the admin, the join link or the command line)
is quick and never waits on a worker.
"""

import os
from functools import cache

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.urls import reverse

from engine.files import load_embeddings
from experiments.models import (
    Pair,
    Question,
    SearchResult,
    Split,
    Study,
    StudySystem,
    Subject,
)
from experiments.plans import (
    Catch,
    PlanError,
    PlannedQuestion,
    build_plan,
    check_design,
    reuse_note,
)

ORDINAL_ATTEMPTS = 5  # two subjects created at once may both take the next ordinal
SPARE_CATCH_QUERIES = 1000  # other splits' items a catch question may take as its query


def plan_for(study: Study, ordinal: int) -> list[PlannedQuestion]:
    """The plan of the study's subject number `ordinal`; PlanError when there can be none."""
    return build_plan(ordinal=ordinal, catch=_catch(study), **_plan_inputs(study))


def _catch(study: Study) -> Catch | None:
    """The study's catch questions: the collection's broken pair, and ready items of other
    splits for catch queries once the test items are all asked."""
    if not study.attention_checks or not study.catch_count:
        return None
    key = (
        Pair.objects.filter(
            collection_id=study.collection_id, split=Split.CATCH, status=Pair.Status.READY
        )
        .values_list("key", flat=True)
        .first()
    )
    if key is None:
        raise PlanError(
            "The study asks catch questions but its collection has no catch media yet: "
            "prepare the study first."
        )
    spare = Pair.objects.filter(
        collection_id=study.collection_id,
        split__in=[Split.TRAIN, Split.VAL],
        status=Pair.Status.READY,
    ).order_by("key")
    return Catch(
        key, study.catch_count, list(spare.values_list("key", flat=True)[:SPARE_CATCH_QUERIES])
    )


def create_subject(study: Study, external_id: str = "", meta: dict | None = None) -> Subject:
    """A new subject of `study` with its stored questions (and the machines' answers)."""
    return _create(study, _study_inputs(study), 1, external_id, meta)[0]


def create_subjects(study: Study, n: int) -> list[Subject]:
    """`n` new subjects of a ready or open study (PlanError for a study in another state),
    BATCH at a time: each batch one transaction, one lock of the study and a few inserts (a
    transaction a subject made 980 subjects by 5,893 queries in 140 s)."""
    if study.status not in (Study.Status.READY, Study.Status.OPEN):
        then = "open it again" if study.status == Study.Status.CLOSED else "prepare it"
        raise PlanError(f"The study is {study.status}: {then} first.")
    inputs = _study_inputs(study)  # read once: the search results are the same for all
    made: list[Subject] = []
    while len(made) < n:
        made += _create(study, inputs, min(BATCH, n - len(made)))
    return made


def _study_inputs(study: Study) -> tuple:
    """What every subject's plan is built from: plan inputs, catch questions, pair ids,
    judges."""
    pair_ids = dict(Pair.objects.filter(collection_id=study.collection_id).values_list("key", "pk"))
    return _plan_inputs(study), _catch(study), pair_ids, _machine_judges(study)


PREPARED = (Study.Status.READY, Study.Status.OPEN, Study.Status.CLOSED)
BATCH = 20  # subjects a transaction: their inserts hold its lock ~0.3 s (SQLite 0.5 s)
# Rows an insert of questions: PostgreSQL takes at most 65,535 parameters a statement.
QUESTION_ROWS = 65_535 // len(Question._meta.concrete_fields)


def _create(
    study: Study, study_inputs: tuple, n: int, external_id: str = "", meta=None
) -> list[Subject]:
    """`n` subjects with the next ordinals, in one transaction."""
    inputs, catch, pair_ids, judges = study_inputs

    def questions(ordinal: int) -> list[dict]:
        """The fields of the questions of subject number `ordinal`, but the subject."""
        return [
            {
                "position": q.position,
                "direction": q.direction,
                "pair_type": q.pair_type,
                "query_id": pair_ids[q.query],
                "option_a_id": pair_ids[q.option_a],
                "option_b_id": pair_ids[q.option_b],
                "kind_a": q.kind_a,
                "kind_b": q.kind_b,
                "is_catch": q.is_catch,
                "machine": {
                    label: choice
                    for label, judge in judges.items()
                    if not q.is_catch and (choice := judge(q)) is not None
                },
            }
            for q in build_plan(ordinal=ordinal, catch=catch, **inputs)
        ]

    # A plan depends on its ordinal alone: those of the ordinals due now are built before
    # the lock (the CPU's work, 20-60 ms each), so that other creations and, on SQLite,
    # participants' answers wait for the inserts only. An ordinal another creation took
    # meanwhile is planned under the lock, as every one was before.
    first = _next_ordinal(study)
    planned = {ordinal: questions(ordinal) for ordinal in range(first, first + n)}
    for attempt in range(ORDINAL_ATTEMPTS):
        try:
            with transaction.atomic():
                # Serialises concurrent creations on PostgreSQL; SQLite locks the whole file.
                now = Study.objects.select_for_update().get(pk=study.pk)
                if study.status in PREPARED and (
                    now.status not in PREPARED or now.preparation != study.preparation
                ):  # back to draft, or redesigned, since `study_inputs` were read
                    raise PlanError(f"{study} changed while its subjects were made: try again.")
                first = _next_ordinal(study)
                ordinals = range(first, first + n)
                planned = {o: planned[o] if o in planned else questions(o) for o in ordinals}
                subjects = Subject.objects.bulk_create(
                    Subject(study=study, ordinal=o, external_id=external_id, meta=meta or {})
                    for o in ordinals
                )
                Question.objects.bulk_create(
                    (
                        Question(subject=subject, **fields)
                        for subject in subjects
                        for fields in planned[subject.ordinal]
                    ),
                    batch_size=QUESTION_ROWS,
                )
                return subjects
        except IntegrityError:
            if attempt == ORDINAL_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _next_ordinal(study: Study) -> int:
    last = study.subjects.aggregate(last=Max("ordinal"))["last"]
    return 0 if last is None else last + 1


def subject_url(subject: Subject, base_url: str) -> str:
    """The subject's link, e.g. https://study.example.org/s/<token>/."""
    return base_url.rstrip("/") + reverse("subject", args=[subject.token])


def check_study_design(study: Study) -> str | None:
    """PlanError when no plan can be built whatever the systems find (too few ready test
    pairs, bad comparisons or labels): cheap, so it runs before any training. Otherwise the
    design's `reuse_note`, or None."""
    design = _design_inputs(study)
    comparisons = check_design(**design)
    return reuse_note(len(set(design["test_keys"])), design["per_type"], len(comparisons))


def _design_inputs(study: Study) -> dict:
    """`check_design`'s arguments for the study: what its plans take besides the results."""
    test_keys = Pair.objects.filter(
        collection_id=study.collection_id, split=Split.TEST, status=Pair.Status.READY
    ).values_list("key", flat=True)
    labels = StudySystem.objects.filter(study=study).values_list("label", flat=True)
    return {
        "test_keys": list(test_keys),
        "per_type": study.per_type,
        "comparisons": study.comparisons or None,
        "labels": sorted(labels) or ("S",),
    }


def _plan_inputs(study: Study) -> dict:
    label_of = dict(StudySystem.objects.filter(study=study).values_list("system_id", "label"))
    results: dict[tuple[str, str, str], list[str]] = {}
    rows = SearchResult.objects.filter(system_id__in=label_of).order_by(
        "system", "direction", "query", "rank"
    )
    for system_id, direction, query, result in rows.values_list(
        "system_id", "direction", "query__key", "result__key"
    ):
        results.setdefault((label_of[system_id], direction, query), []).append(result)
    return {**_design_inputs(study), "results": results, "seed": study.seed}


def _machine_judges(study: Study) -> dict:
    """label → judge(question) → 'a' | 'b' | None: the candidate the system prefers.

    A system with embeddings prefers the candidate nearer the query (cosine); one with only
    ranked results (uploaded) prefers the one it ranks higher; None where it cannot tell.
    """
    judges = {}
    for link in StudySystem.objects.filter(study=study).select_related("system"):
        system = link.system
        if system.embeddings and system.embeddings.storage.exists(system.embeddings.name):
            judges[link.label] = _embedding_judge(system.embeddings.path)
        else:
            judges[link.label] = _ranking_judge(system.pk)
    return judges


def _embedding_judge(path: str):
    index, spaces = _load_embeddings(path, os.stat(path).st_mtime_ns)

    def judge(q: PlannedQuestion):
        queries, candidates = ("video", "music") if q.direction == "V2M" else ("music", "video")
        try:
            query = spaces[queries][index[q.query]]
            a, b = (spaces[candidates][index[key]] for key in (q.option_a, q.option_b))
        except KeyError:
            return None
        sim_a, sim_b = float(query @ a), float(query @ b)
        return None if sim_a == sim_b else ("a" if sim_a > sim_b else "b")

    return judge


@cache
def _load_embeddings(path: str, mtime_ns: int):
    """Keys → row and L2-normalised embeddings; read once per file version and process."""
    from sklearn.preprocessing import normalize

    keys, video, music = load_embeddings(path)
    index = {key: i for i, key in enumerate(keys)}
    return index, {"video": normalize(video), "music": normalize(music)}


def _ranking_judge(system_id: int):
    ranks = {
        (direction, query, result): rank
        for direction, query, result, rank in SearchResult.objects.filter(
            system_id=system_id
        ).values_list("direction", "query__key", "result__key", "rank")
    }

    def judge(q: PlannedQuestion):
        missing = float("inf")
        rank_a = ranks.get((q.direction, q.query, q.option_a), missing)
        rank_b = ranks.get((q.direction, q.query, q.option_b), missing)
        if rank_a == rank_b:
            return None
        return "a" if rank_a < rank_b else "b"

    return judge
