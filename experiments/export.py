"""A study's answers as rows, one per answer: what `export_responses` and the admin write.

Columns: study, subject (its token), external_id, subject_completed, position, direction,
pair_type, query, option_a, option_b (pair keys), kind_a, kind_b, chosen_item (pair key),
chosen (its kind: 'G', 'R' or a system label, as the analysis contract names it),
response_ms, answered_at (ISO 8601, UTC), and machine_<label> per system of the study: the
kind that system's machine judge chose ('' where it could not tell).
"""

from collections.abc import Iterator

from experiments.models import Response, Study


def response_rows(study: Study) -> Iterator[dict]:
    labels = sorted(study.studysystem_set.values_list("label", flat=True))
    responses = (
        Response.objects.filter(subject__study=study)
        .select_related("subject", "question__query", "question__option_a", "question__option_b")
        .order_by("subject__ordinal", "question__position")
    )
    for response in responses.iterator(chunk_size=2000):
        q, subject = response.question, response.subject
        kinds = {"a": q.kind_a, "b": q.kind_b}
        yield {
            "study": study.slug,
            "subject": subject.token,
            "external_id": subject.external_id,
            "subject_completed": subject.completed_at is not None,
            "position": q.position,
            "direction": q.direction,
            "pair_type": q.pair_type,
            "query": q.query.key,
            "option_a": q.option_a.key,
            "option_b": q.option_b.key,
            "kind_a": q.kind_a,
            "kind_b": q.kind_b,
            "chosen_item": (q.option_a if response.choice == "a" else q.option_b).key,
            "chosen": response.chosen_kind,
            "response_ms": response.response_ms,
            "answered_at": response.answered_at.isoformat(),
            **{f"machine_{label}": kinds.get(q.machine.get(label), "") for label in labels},
        }
