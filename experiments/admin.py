"""The researchers' side, in the Django admin.

Collections (pair counts per status and split, failed pairs with their errors), systems (state,
progress, metrics) and studies: create one from a collection and its systems, prepare it (a
Celery task), open and close it, hand out subject links (CSV) or its public join link, watch
each subject's progress, export the answers and see the results.
"""

import csv
import itertools
import json
import secrets
import shutil
from pathlib import Path

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.db.models import Count, Exists, IntegerField, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.text import slugify
from django.utils.timesince import timesince

from . import checks
from .export import column_names, dictionary_rows, response_rows, spreadsheet_safe
from .forms import CollectionUploadForm, SubjectLinksForm, stored_name
from .ingest import ManifestError, add_pairs, import_settings
from .models import (
    EDITABLE_DESIGN,
    UPLOADS,
    Collection,
    Pair,
    Question,
    Response,
    Split,
    Study,
    StudySystem,
    Subject,
    System,
    design_locked,
    locking_studies,
)
from .plans import PlanError
from .power import study_power
from .results import study_results
from .subjects import create_subjects, subject_url
from .tasks import celery_problem, import_pair, queue_preparation, recall_summary
from .uploads import upload_view

admin.site.site_header = "Video–music preference studies"
admin.site.site_title = "Studies"


def changelist_url(model, **filters) -> str:
    query = "&".join(f"{key}={value}" for key, value in filters.items())
    return reverse(f"admin:experiments_{model._meta.model_name}_changelist") + f"?{query}"


# --- Collections and pairs ---------------------------------------------------------------


LISTED = 100  # objects of one kind that a deletion's confirmation names (the rest counted)


class SummarisedDeletion(admin.ModelAdmin):
    """A deletion's confirmation names the first LISTED objects of each kind, not them all:
    a system's search results (2 × 10 per test pair), a collection's 200,000 pairs made
    pages of many MB that a browser could not show. Its summary still counts them all."""

    def get_deleted_objects(self, objs, request):
        to_delete, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        return shortened(to_delete), counts, perms_needed, protected


class PlansDeletion(SummarisedDeletion):
    """Deleting studies or subjects: their subjects' answers and questions (120 a subject) go
    by one statement each, and the confirmation counts them. Django's walk visits every one
    of them: a study of 1,000 subjects asked about 124,000 questions in one query, past
    PostgreSQL's 65,535 parameters (a 503 after 40 s and 0.5 GB; 100 s without that limit)."""

    subject_field = "pk"  # the field of Subject that names the objects deleted

    def subjects_of(self, objs):
        chosen = [getattr(obj, "pk", obj) for obj in objs]
        return Subject.objects.filter(**{f"{self.subject_field}__in": chosen})

    def get_deleted_objects(self, objs, request):
        objs = list(objs)
        subjects = self.subjects_of(objs)
        counts = {
            self.model: len(objs),
            Subject: subjects.count(),
            Question: Question.objects.filter(subject__in=subjects).count(),
            Response: Response.objects.filter(subject__in=subjects).count(),
        }
        if self.model is Study:
            counts[StudySystem] = StudySystem.objects.filter(study__in=objs).count()
        model_count = {m._meta.verbose_name_plural: n for m, n in counts.items() if n}
        perms_needed = set()
        subject_admin = self.admin_site._registry[Subject]
        if counts[Subject] and not subject_admin.has_delete_permission(request):
            perms_needed.add(Subject._meta.verbose_name_plural)
        return shortened([str(obj) for obj in objs]), model_count, perms_needed, []

    def delete_model(self, request, obj):
        self.delete_queryset(request, self.model.objects.filter(pk=obj.pk))

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            chosen = list(queryset.values_list("pk", flat=True))
            subjects = self.subjects_of(chosen)
            # Locked first: an answer being stored waits, then finds its subject gone.
            list(Subject.objects.select_for_update().filter(pk__in=subjects).values_list("pk"))
            Response.objects.filter(subject__in=subjects).delete()  # nothing refers to them
            # Their answers gone, nothing refers to the questions: one statement, no walk.
            Question.objects.filter(subject__in=subjects)._raw_delete(Question.objects.db)
            super().delete_queryset(request, self.model.objects.filter(pk__in=chosen))


def shortened(nested: list) -> list:
    """Django's nested list of objects to delete (each object followed by the list of its
    own), with at most LISTED objects at each level and how many more."""
    out, kept, left = [], 0, 0
    for entry in nested:
        if isinstance(entry, list):  # the objects of the entry before it
            if kept <= LISTED and not left:
                out.append(shortened(entry))
        elif kept < LISTED:
            out.append(entry)
            kept += 1
        else:
            left += 1
    if left:
        out.append(f"… and {left} more (counted in the summary)")
    return out


@admin.register(Collection)
class CollectionAdmin(SummarisedDeletion):
    list_display = ["name", "pairs_by_status", "pairs_by_split", "created_at"]
    search_fields = ["name", "source"]
    readonly_fields = ["created_at", "pairs_by_status", "pairs_by_split", "import_settings"]
    actions = ["import_again"]

    def get_deleted_objects(self, objs, request):
        systems = System.objects.filter(collection__in=objs)
        if studies := list(
            Study.objects.filter(collection__in=objs).select_related("collection").order_by("pk")
        ):
            # A study's collection cannot go (PROTECT), nor the pairs its questions show:
            # Django's walk listed every one of those questions (124,000: 18-42 s, a page of
            # 5.3 MB, ~1 GB) to refuse. The studies say why, and the systems they hold.
            protected = [study_as_protected(request, study) for study in studies]
            return locked_systems_as_protected(request, systems, [], {}, set(), protected)
        deleted = super().get_deleted_objects(objs, request)
        return locked_systems_as_protected(request, systems, *deleted)

    @admin.action(description="Import the pairs not ready again (pending: their task was lost)")
    def import_again(self, request, queryset):
        """Each pair not ready (pending: its task lost with a broker's queue; failed: its file
        fixed since) is queued again, with its collection's settings."""
        if problem := celery_problem(["gpu"]):
            self.message_user(request, f"Nothing queued: {problem}.", messages.ERROR)
            return
        for collection in queryset:
            if not collection.import_settings:  # imported before they were stored
                self.message_user(
                    request, f"{collection}: its import settings are not known; run "
                    "import_collection again with its first run's options.", messages.WARNING,
                )  # fmt: skip
                continue
            made = collection.import_settings
            again = collection.pairs.exclude(status=Pair.Status.READY).exclude(split=Split.CATCH)
            ids = list(again.values_list("pk", flat=True))
            for pk in ids:
                import_pair.delay(pk, made["clip_s"], made["encoder"], made["frame_size"])
            self.message_user(
                request, f"{collection}: {len(ids)} pairs queued again.", messages.SUCCESS
            )

    def get_queryset(self, request):
        counts = {
            f"n_{value}": Count("pairs", filter=Q(pairs__status=value))
            for value in Pair.Status.values
        }
        ready = Q(pairs__status=Pair.Status.READY)
        counts |= {
            f"n_{value}": Count("pairs", filter=ready & Q(pairs__split=value))
            for value in Split.values
        }
        return super().get_queryset(request).annotate(**counts)

    def _counts(self, collection, field, values, **filters):
        if not hasattr(collection, f"n_{values[0]}"):  # the add form: nothing to count
            return "–"
        return format_html_join(
            " · ",
            '<a href="{}">{} {}</a>',
            (
                (
                    changelist_url(
                        Pair,
                        collection__id__exact=collection.pk,
                        **filters,
                        **{f"{field}__exact": value},
                    ),
                    getattr(collection, f"n_{value}"),
                    value,
                )
                for value in values
            ),
        )

    def get_urls(self):
        upload = path(
            "upload/",
            self.admin_site.admin_view(self.upload_view),
            name="experiments_collection_upload",
        )
        return [upload, *super().get_urls()]

    def upload_view(self, request):
        """Upload a few music videos; each becomes a pair, processed by the workers."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = CollectionUploadForm(
            request.POST or None,
            request.FILES or None,
            max_bytes=settings.ADMIN_UPLOAD_MAX_BYTES,
        )
        if request.method == "POST" and form.is_valid():
            collection = self._import_upload(request, form)
            if collection is not None:
                return HttpResponseRedirect(
                    reverse("admin:experiments_collection_change", args=[collection.pk])
                )
        context = {
            **self.admin_site.each_context(request),
            "title": "Upload a small collection",
            "form": form,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/experiments/collection/upload.html", context)

    def _import_upload(self, request, form) -> Collection | None:
        """Write the files into a folder of their own (the import reads exactly these) and add
        their pairs; None, with the form's error, when the import is refused."""
        if problem := celery_problem([]):  # the workers could not be asked: write nothing
            form.add_error(None, f"{problem}.")
            return None
        name = form.cleaned_data["name"]
        folder = (
            Path(settings.MEDIA_ROOT)
            / UPLOADS
            / (f"{slugify(name) or 'collection'}-{secrets.token_hex(4)}")
        )
        try:
            folder.mkdir(parents=True)
            for upload in form.cleaned_data["files"]:
                with open(folder / stored_name(upload), "wb") as out:
                    for chunk in upload.chunks():
                        out.write(chunk)
        except OSError as error:  # a full disk: no truncated copy that nothing refers to
            shutil.rmtree(folder, ignore_errors=True)
            form.add_error(
                None,
                f"Could not store the files in MEDIA_ROOT ({error.strerror or error}); "
                "nothing was imported.",
            )
            return None
        try:
            with transaction.atomic():  # refused: no collection, no pairs, and no files
                added = add_pairs(name, folder, test=form.cleaned_data["test"])
                made = import_settings(added.collection, form.cleaned_data["clip_seconds"])
        except (ManifestError, ValueError) as error:
            shutil.rmtree(folder, ignore_errors=True)
            form.add_error(None, str(error))
            return None
        collection = added.collection
        for key, change in added.changed:
            self.message_user(request, f"{key}: {change}", messages.WARNING)
        for note in added.notes:
            self.message_user(request, note, messages.WARNING)
        try:
            for pair in added.todo:
                import_pair.delay(pair.pk, made["clip_s"], made["encoder"], made["frame_size"])
        except Exception as error:  # the broker is unreachable: the pairs wait, pending
            self.message_user(
                request, f"{collection}: could not queue the import: {error}", messages.ERROR
            )
        else:
            self.message_user(
                request,
                f"{collection}: {len(added.todo)} of {len(added.keys)} pairs queued for "
                "processing.",
                messages.SUCCESS,
            )
        return collection

    @admin.display(description="pairs by status")
    def pairs_by_status(self, collection):
        return self._counts(collection, "status", Pair.Status.values)

    # The ready pairs by split add up to the ready count (the catch pair that attention
    # checks add is a split of its own); failed and pending pairs have no split to count.
    @admin.display(description="ready pairs by split")
    def pairs_by_split(self, collection):
        return self._counts(collection, "split", Split.values, status__exact=Pair.Status.READY)


@admin.register(Pair)
class PairAdmin(SummarisedDeletion):
    list_display = ["key", "collection", "title", "genre", "split", "status", "short_error"]
    list_filter = ["collection", "status", "split"]
    search_fields = ["key", "title", "genre", "error"]
    list_select_related = ["collection"]
    readonly_fields = [
        "collection",
        "key",
        "source_video",
        "source_music",
        "video_file",
        "music_file",
        "video_token",
        "music_token",
        "features_file",
        "duration_s",
        "status",
        "error",
        "previews",
    ]
    fields = ["title", "genre", "split", *readonly_fields]

    def has_add_permission(self, request):
        return False  # pairs come from importing a collection

    @admin.display(description="error")
    def short_error(self, pair):
        return pair.error[:120]

    @admin.display(description="preview")
    def previews(self, pair):
        if not (pair.video_file and pair.music_file):  # pending or failed: nothing to play
            reason = f" — {pair.error}" if pair.error else ""
            return f"no media: {pair.status}{reason}"
        return format_html(
            '<video src="{}" controls muted width="320"></video><br><audio src="{}" controls></audio>',
            reverse("media", args=[pair.video_token]),
            reverse("media", args=[pair.music_token]),
        )


# --- Systems ---------------------------------------------------------------------------


@admin.register(System)
class SystemAdmin(SummarisedDeletion):
    list_display = ["name", "collection", "kind", "status", "progress_percent", "test_recall"]
    list_filter = ["status", "kind", "collection"]
    search_fields = ["name"]
    list_select_related = ["collection"]
    readonly_fields = [
        "status",
        "progress_percent",
        "message",
        "metrics_table",
        "source_file",  # replaced only through the checked upload
        "created_at",
    ]
    exclude = ["progress", "metrics"]

    @admin.display(description="progress")
    def progress_percent(self, system):
        return progress_with_age(system, system.status == System.Status.RUNNING)

    @admin.display(description="test recall")
    def test_recall(self, system):
        test = system.metrics.get("test")
        return recall_summary(test) if test else ""

    @admin.display(description="metrics")
    def metrics_table(self, system):
        return format_html("<pre>{}</pre>", json.dumps(system.metrics, indent=2, sort_keys=True))

    def get_urls(self):
        upload = path(
            "upload/",
            self.admin_site.admin_view(upload_view),
            name="experiments_system_upload",
        )
        return [upload, *super().get_urls()]

    # A system is part of the design of each study that uses it: while one of them is locked
    # (design_locked: open, closed or preparing, or with subjects) it is shown read-only and
    # cannot be deleted; an edit under a ready study sends that study back to draft.

    def _locking(self, system) -> list[Study]:
        if system is None or system.pk is None:
            return []
        if not hasattr(system, "locking_studies"):  # asked several times per request
            system.locking_studies = locking_studies(system)
        return system.locking_studies

    def has_change_permission(self, request, obj=None):
        return super().has_change_permission(request, obj) and not self._locking(obj)

    def has_delete_permission(self, request, obj=None):
        return super().has_delete_permission(request, obj) and not self._locking(obj)

    def get_deleted_objects(self, objs, request):
        return locked_systems_as_protected(
            request, objs, *super().get_deleted_objects(objs, request)
        )

    def change_view(self, request, object_id, form_url="", extra_context=None):
        system = self.get_object(request, object_id)
        if studies := self._locking(system):
            names = ", ".join(
                f"{study} ({study.status}, {study.subjects.count()} subjects)" for study in studies
            )
            note = (
                f"{system.name} is in the fixed design of {names}: it cannot be changed or "
                "deleted. Add a new system (or upload under a new name) for other settings."
            )
            if request.method == "POST":  # a stale page or a crafted request: nothing saved
                self.message_user(request, f"Not saved: {note}", messages.ERROR)
                return HttpResponseRedirect(request.path)
            self.message_user(request, note, messages.WARNING)
        return super().change_view(request, object_id, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        design = {"collection", "kind"} | (
            {"config"} if obj.kind != System.Kind.EXTERNAL else set()
        )
        if change and design & set(form.changed_data):
            # Kept, the old checkpoint or results would serve the new settings' study.
            obj.forget_training()
            ready = Study.objects.filter(systems=obj, status=Study.Status.READY)
            for study in ready:
                self.message_user(
                    request,
                    f"{study}: its system {obj.name} changed, so it is a draft again: prepare "
                    "it again.",
                    messages.WARNING,
                )
            ready.update(status=Study.Status.DRAFT, message="A system changed: prepare it again.")


QUIET_S = 120  # a preparation's reports come every epoch: longer without one is worth a note


def progress_with_age(obj, at_work: bool) -> str:
    """'42%', and, for work that has not reported for a while, how long ago it last did (a
    worker that died shows nothing else until its task is delivered again, hours later)."""
    shown = f"{obj.progress:.0%}"
    if at_work and obj.progress_at is not None:
        quiet = (timezone.now() - obj.progress_at).total_seconds()
        if quiet >= QUIET_S:
            shown += f", last news {timesince(obj.progress_at)} ago"
    return shown


def locked_systems_as_protected(request, systems, to_delete, counts, perms_needed, protected):
    """Django's deletion summary, where a system that a study's design holds is reported
    as a permission the account lacks ("…doesn't have permission to delete: system"):
    listed as protected instead, with the studies that hold it."""
    # `locking_studies` of every system in one query (it took two a system and study):
    # design_locked's rule, a study not editable or with subjects.
    holding = (
        StudySystem.objects.filter(system__in=systems)
        .filter(
            ~Q(study__status__in=EDITABLE_DESIGN)
            | Exists(Subject.objects.filter(study=OuterRef("study_id")))
        )
        .select_related("system", "study")
        .order_by("system_id", "study_id")
    )
    held = [
        f"System: {system.name}, in the fixed design of "
        + ", ".join(f"study {link.study} ({link.study.status})" for link in links)
        for system, links in itertools.groupby(holding, key=lambda link: link.system)
    ]
    if held and request.user.has_perm("experiments.delete_system"):
        perms_needed = perms_needed - {str(System._meta.verbose_name)}
        protected = [*protected, *held]
    return to_delete, counts, perms_needed, protected


def study_as_protected(request, study) -> str:
    """A study named as what keeps its collection from being deleted (linked for those who
    may change it, as Django names a protected object)."""
    name = study.name
    if request.user.has_perm("experiments.change_study"):
        url = reverse("admin:experiments_study_change", args=[study.pk])
        name = format_html('<a href="{}">{}</a>', url, study)
    return format_html(
        "Study: {} ({}), which uses collection {}: delete the study first",
        name,
        study.status,
        study.collection,
    )


# --- Studies ---------------------------------------------------------------------------


class StudySystemFormSet(forms.BaseInlineFormSet):
    def clean(self):
        kept = [
            form for form in self.forms
            if getattr(form, "cleaned_data", None) and form.cleaned_data.get("system")
            and not form.cleaned_data.get("DELETE")
        ]  # fmt: skip
        if len(kept) > 1 and all(form.cleaned_data.get("label") == "S" for form in kept):
            for number, form in enumerate(kept, start=1):  # left at 'S': numbered in order
                form.cleaned_data["label"] = form.instance.label = f"S{number}"
        super().clean()
        if design_locked(self.instance):  # shown read-only, nothing of it is saved
            return
        collection = self.instance.collection if self.instance.collection_id else None
        for form in self.forms:
            system = form.cleaned_data.get("system")
            if form.cleaned_data.get("DELETE") or system is None or collection is None:
                continue
            if system.collection_id != collection.pk:
                form.add_error(
                    "system",
                    f"{system_choice_label(system)} belongs to another collection than "
                    f"{collection}.",
                )


def system_choice_label(system: System) -> str:
    return f"{system.collection} / {system.name} ({system.get_kind_display()})"


class StudySystemInline(admin.TabularInline):
    model = StudySystem
    formset = StudySystemFormSet
    extra = 1
    fields = ["system", "label"]

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.name == "system":  # collections may hold systems of the same name
            field.queryset = field.queryset.select_related("collection").order_by(
                "collection__name", "name"
            )
            field.label_from_instance = system_choice_label
        return field

    def has_add_permission(self, request, obj=None):
        return super().has_add_permission(request, obj) and not design_locked(obj)

    def has_change_permission(self, request, obj=None):
        return super().has_change_permission(request, obj) and not design_locked(obj)

    def has_delete_permission(self, request, obj=None):
        return super().has_delete_permission(request, obj) and not design_locked(obj)


def with_progress(subjects):
    """Subjects with `answered` and `total` counts, each a subquery: a join with GROUP BY made
    PostgreSQL run the answers' subquery once per question of every subject listed (8 s for
    1,000 subjects; 5 ms this way), and the list's count pay the same."""

    def per_subject(model):
        counted = model.objects.filter(subject=OuterRef("pk")).values("subject")
        counted = counted.annotate(n=Count("pk")).values("n")
        return Coalesce(Subquery(counted, output_field=IntegerField()), 0)

    return subjects.annotate(answered=per_subject(Response), total=per_subject(Question))


class DesignLocked(Exception):
    """A study's design locked while its page was open: the page's changes are not saved."""


@admin.register(Study)
class StudyAdmin(PlansDeletion):
    list_display = ["name", "collection", "status", "progress_percent", "subjects_summary"]
    list_filter = ["status", "collection"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    inlines = [StudySystemInline]
    subject_field = "study"

    actions = [
        "prepare_studies",
        "draft_studies",
        "open_studies",
        "close_studies",
        "subject_links",
        "export_responses",
    ]
    readonly_fields = [
        "status",
        "progress_percent",
        "message",
        "join_link",
        "subjects_summary",
        "created_at",
    ]
    DESIGN_FIELDS = [
        "collection",
        "per_type",
        "comparisons",
        "seed",
        "attention_checks",
        "catch_count",
        "catch_pass_threshold",
        "sound_check",
    ]
    # How answers are given: fixed with the design (answers under other rules would mix in
    # one table), though a change needs no new preparation.
    ANSWER_RULES = ["play_before_answer", "min_listen_ms"]
    fieldsets = [
        (None, {"fields": ["name", "slug", "collection"]}),
        (
            "Question plan",
            {
                "fields": ["per_type", "comparisons", "seed"],
                # Relative: /study/add/ → /study/power/, /study/<id>/change/ → /study/<id>/power/
                "description": 'Size the study first: <a href="../power/">power planning</a>.',
            },
        ),
        (
            "Participant pages",
            {
                "fields": [
                    "language",
                    "instructions",
                    "consent_text",
                    "require_consent",
                    "play_before_answer",
                    "min_listen_ms",
                    "completion_code",
                    "redirect_url",
                    "external_id_param",
                    "join_cap",
                ]
            },
        ),
        (
            "Crowd-sourcing checks",
            {
                "fields": [
                    "attention_checks",
                    "catch_count",
                    "catch_pass_threshold",
                    "sound_check",
                    "failed_attention_code",
                    "failed_sound_code",
                    "no_consent_code",
                ],
                "description": "Codes per outcome; a redirect URL may hold {code}, e.g. "
                "https://app.prolific.com/submissions/complete?cc={code}.",
            },
        ),
        (
            "State",
            {
                "fields": [
                    "status",
                    "progress_percent",
                    "message",
                    "join_link",
                    "subjects_summary",
                    "created_at",
                ]
            },
        ),
    ]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .select_related("collection")
            .annotate(
                n_subjects=Count("subjects", distinct=True),
                n_completed=Count(
                    "subjects", filter=Q(subjects__completed_at__isnull=False), distinct=True
                ),
            )
        )

    def get_readonly_fields(self, request, obj=None):
        if design_locked(obj):
            return [*self.readonly_fields, *self.DESIGN_FIELDS, *self.ANSWER_RULES]
        return self.readonly_fields

    def design(self, study: Study) -> tuple:
        """What preparation checked: the design fields, the systems and their labels."""
        fields = Study._meta.get_field
        values = tuple(getattr(study, fields(name).attname) for name in self.DESIGN_FIELDS)
        return values, sorted(study.studysystem_set.values_list("system_id", "label"))

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:  # its transaction is rolled back when the design locked meanwhile
            return super().changeform_view(request, object_id, form_url, extra_context)
        except DesignLocked as error:
            self.message_user(request, f"Not saved: {error}", messages.ERROR)
            return HttpResponseRedirect(request.path)

    def save_model(self, request, obj, form, change):
        if change:  # as stored, before this form's changes; locked until saved
            obj.design_before = self.design(Study.objects.select_for_update().get(pk=obj.pk))
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        study = form.instance
        redesigned = change and self.design(study) != study.design_before
        if redesigned and design_locked(Study.objects.get(pk=study.pk)):
            raise DesignLocked(
                f"{study} has subjects now (made while this page was open): its design is fixed."
            )
        if redesigned and study.status == Study.Status.READY:
            Study.objects.filter(pk=study.pk, status=Study.Status.READY).update(
                status=Study.Status.DRAFT, message="Changed after preparing: prepare it again."
            )
            self.message_user(
                request,
                f"{study}: its design changed, so it is a draft again: prepare it again.",
                messages.WARNING,
            )

    @admin.display(description="progress")
    def progress_percent(self, study):
        return progress_with_age(study, study.status == Study.Status.PREPARING)

    @admin.display(description="subjects")
    def subjects_summary(self, study):
        if study.pk is None:
            return "–"
        return format_html(
            '<a href="{}">{} subjects, {} completed</a>',
            changelist_url(Subject, study__id__exact=study.pk),
            getattr(study, "n_subjects", None) or study.subjects.count(),
            getattr(study, "n_completed", None)
            or study.subjects.filter(completed_at__isnull=False).count(),
        )

    @admin.display(description="public join link")
    def join_link(self, study):
        if study.pk is None:
            return "–"
        link = reverse("join", args=[study.join_token])
        cap = f" (at most {study.join_cap} subjects)" if study.join_cap else ""
        return format_html('<a href="{}">{}</a>{}', link, link, cap)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        results = reverse("admin:experiments_study_results", args=[object_id])
        extra_context = {**(extra_context or {}), "results_url": results}
        return super().change_view(request, object_id, form_url, extra_context)

    # Actions

    @admin.action(description="Prepare (compute search results, then mark ready)")
    def prepare_studies(self, request, queryset):
        if problem := celery_problem([]):
            self.message_user(request, f"Nothing queued: {problem}.", messages.ERROR)
            return
        queued = False
        for study in queryset:
            try:
                if not queue_preparation(study):
                    study.refresh_from_db(fields=["status"])
                    self.message_user(
                        request, f"{study}: {study.status}, not prepared again.", messages.WARNING
                    )
                    continue
            except Exception as error:  # the broker is unreachable: say so, change nothing
                self.message_user(request, f"{study}: could not queue: {error}", messages.ERROR)
                continue
            self.message_user(request, f"{study}: preparation queued.", messages.SUCCESS)
            queued = True
        if queued and (problem := celery_problem(["default", "gpu"])):  # waits for a worker
            self.message_user(request, f"{problem} to run it.", messages.WARNING)

    @admin.action(description="Back to draft (e.g. a preparation that will not finish)")
    def draft_studies(self, request, queryset):
        # A preparation whose task was lost (a broker restarted without its queue) would stay
        # "preparing" for ever: from draft it can be prepared again.
        chosen = list(queryset.values_list("pk", flat=True))
        with transaction.atomic():
            # Locked first: subjects being made now (their plans from this design) are then
            # seen by the next statement, and keep the study as it is.
            movable = Study.objects.select_for_update().filter(
                pk__in=chosen,
                status__in=[Study.Status.PREPARING, Study.Status.READY, Study.Status.FAILED],
            )
            movable = list(movable.values_list("pk", flat=True))
            moved = Study.objects.filter(pk__in=movable, subjects__isnull=True).update(
                status=Study.Status.DRAFT, message="Back to draft: prepare it again.", progress=0.0
            )
        if moved:
            self.message_user(request, f"{moved} study(ies) now draft.", messages.SUCCESS)
        if skipped := queryset.count() - moved:
            self.message_user(
                request,
                f"{skipped} study(ies) skipped: only preparing, ready or failed studies without "
                "subjects go back to draft.",
                messages.WARNING,
            )

    @admin.action(description="Open for participants")
    def open_studies(self, request, queryset):
        self._move(request, queryset, [Study.Status.READY, Study.Status.CLOSED], Study.Status.OPEN)

    @admin.action(description="Close")
    def close_studies(self, request, queryset):
        self._move(request, queryset, [Study.Status.OPEN], Study.Status.CLOSED)

    def _move(self, request, queryset, sources, target):
        moved = queryset.filter(status__in=sources).update(status=target)
        if moved:
            self.message_user(request, f"{moved} study(ies) now {target}.", messages.SUCCESS)
        if skipped := queryset.exclude(status=target).count():
            allowed = " or ".join(sources)
            self.message_user(
                request,
                f"{skipped} study(ies) skipped: only {allowed} ones can be made {target}.",
                messages.WARNING,
            )

    @admin.action(description="Generate subject links…")
    def subject_links(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Choose exactly one study.", messages.WARNING)
            return None
        return HttpResponseRedirect(
            reverse("admin:experiments_study_links", args=[queryset.get().pk])
        )

    # Links and raw responses hold subjects' tokens, which open their questions: for those
    # who may change a study, not those who may only view it.
    @admin.action(description="Export responses (CSV)", permissions=["change"])
    def export_responses(self, request, queryset):
        studies = queryset.order_by("pk")
        # Studies' systems differ: every study's machine columns, in one header.
        header = list(dict.fromkeys(c for study in studies for c in column_names(study)))
        rows = itertools.chain.from_iterable(response_rows(study) for study in studies)
        return csv_response("responses.csv", rows, header)

    # Pages of one study

    def get_urls(self):
        own = [
            path(
                "<int:study_id>/links/",
                self.admin_site.admin_view(self.links_view),
                name="experiments_study_links",
            ),
            path(
                "<int:study_id>/links.csv",
                self.admin_site.admin_view(self.links_csv_view),
                name="experiments_study_links_csv",
            ),
            path(
                "<int:study_id>/responses.csv",
                self.admin_site.admin_view(self.responses_view),
                name="experiments_study_responses",
            ),
            path(
                "<int:study_id>/results/",
                self.admin_site.admin_view(study_results),
                name="experiments_study_results",
            ),
            path(
                "power/",
                self.admin_site.admin_view(study_power),
                name="experiments_study_power_new",
            ),
            path(
                "<int:study_id>/power/",
                self.admin_site.admin_view(study_power),
                name="experiments_study_power",
            ),
        ]
        return own + super().get_urls()

    def _study(self, request, study_id, permission="view"):
        study = get_object_or_404(Study, pk=study_id)
        allowed = getattr(self, f"has_{permission}_permission")(request, study)
        if not allowed:
            raise PermissionDenied
        return study

    def links_view(self, request, study_id):
        """A form for N new subjects; its answer is a CSV of their links."""
        study = self._study(request, study_id, "change")
        form = SubjectLinksForm(
            request.POST or None, initial={"base_url": request.build_absolute_uri("/")}
        )
        if request.method == "POST" and form.is_valid():
            try:
                subjects = create_subjects(study, form.cleaned_data["count"])
            except PlanError as error:
                form.add_error(None, str(error))
            else:
                base = form.cleaned_data["base_url"]
                rows = (
                    {"ordinal": s.ordinal, "token": s.token, "url": subject_url(s, base)}
                    for s in subjects
                )
                return csv_response(f"{study.slug}-new-links.csv", rows)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Subject links for {study}",
            "study": study,
            "form": form,
            "opts": self.model._meta,
            "subjects": study.subjects.count(),
            "join_url": join_url(request, study),
        }
        return TemplateResponse(request, "admin/experiments/study/links.html", context)

    def links_csv_view(self, request, study_id):
        """Every subject's link with its progress and outcome: what a researcher needs to
        pay or reject crowd workers (their ids, end code, attention score, time taken)."""
        study = self._study(request, study_id, "change")
        base = request.build_absolute_uri("/")
        subjects = with_progress(study.subjects.order_by("ordinal"))
        rows = (
            {
                "ordinal": s.ordinal,
                "external_id": s.external_id,
                **{name: s.meta.get("entry", {}).get(name, "") for name in PLATFORM_IDS},
                "url": subject_url(s, base),
                "answered": s.answered,
                "total": s.total,
                "outcome": s.outcome or "in_progress",
                "end_code": checks.end_code(s) if s.outcome else "",
                "catch_score": s.catch_score,
                "created_at": s.created_at.isoformat(),
                "started_at": s.consented_at.isoformat() if s.consented_at else "",
                "last_seen": s.last_seen.isoformat() if s.last_seen else "",
                "completed_at": s.completed_at.isoformat() if s.completed_at else "",
                # A server clock set back between consent and completion: 0, not negative.
                "minutes": round(
                    max(0.0, (s.completed_at - s.consented_at).total_seconds()) / 60, 1
                )
                if s.completed_at and s.consented_at
                else "",
            }
            for s in subjects
        )
        return csv_response(f"{study.slug}-links.csv", rows, LINK_COLUMNS)

    def responses_view(self, request, study_id):
        """The answers as CSV; `?anonymise=1`: pseudonyms; `?dictionary=1`: the columns."""
        anonymise = bool(request.GET.get("anonymise"))
        study = self._study(request, study_id, "view" if anonymise else "change")
        if request.GET.get("dictionary"):
            rows = dictionary_rows(study)
            return csv_response(f"{study.slug}-dictionary.csv", rows, ["column", "meaning"])
        name = f"{study.slug}-responses{'-anonymised' if anonymise else ''}.csv"
        return csv_response(name, response_rows(study, anonymise), column_names(study))


# The platforms' ids of a visit that identify a submission (besides the external id).
PLATFORM_IDS = ("SESSION_ID", "assignmentId", "hitId")
LINK_COLUMNS = [
    "ordinal", "external_id", *PLATFORM_IDS, "url", "answered", "total", "outcome", "end_code",
    "catch_score", "created_at", "started_at", "last_seen", "completed_at", "minutes",
]  # fmt: skip


def join_url(request, study) -> str:
    """The absolute join link; with Prolific's placeholder for the study's id parameter."""
    url = request.build_absolute_uri(reverse("join", args=[study.join_token]))
    param = study.external_id_param
    return f"{url}?{param}={{{{%{param}%}}}}" if param else url


class _Echo:
    def write(self, value):
        return value


def csv_response(filename: str, rows, header: list[str] | None = None) -> StreamingHttpResponse:
    """A streamed CSV download of dict rows; `header` names the columns (default: the first
    row's keys), so an export without rows still says what it would hold. Every cell passes
    through `spreadsheet_safe`: participants' strings never open as formulas."""
    writer = csv.writer(_Echo())

    def line(values):
        return writer.writerow([spreadsheet_safe(value) for value in values])

    def lines():
        columns = header
        if columns is not None:
            yield line(columns)
        for row in rows:
            if columns is None:
                columns = list(row)
                yield line(columns)
            yield line([row.get(key, "") for key in columns])

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{slugify(filename[:-4])}.csv"'
    return response


# --- Subjects: live progress -------------------------------------------------------------


class CompletedFilter(admin.SimpleListFilter):
    title = "completed"
    parameter_name = "completed"

    def lookups(self, request, model_admin):
        return [("yes", "completed"), ("no", "not completed")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(completed_at__isnull=self.value() == "no")
        return queryset


class ResponseInline(admin.TabularInline):
    model = Response
    fields = ["question_position", "choice", "chosen_kind", "response_ms", "answered_at"]
    readonly_fields = fields
    ordering = ["question__position"]
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("question")

    @admin.display(description="question")
    def question_position(self, response):
        return response.question.position


@admin.register(Subject)
class SubjectAdmin(PlansDeletion):
    list_display = [
        "__str__",
        "external_id",
        "answered_of_total",
        "consented_at",
        "last_seen",
        "completed_at",
        "outcome",
        "catch_score_percent",
    ]
    list_filter = ["study", CompletedFilter, "outcome"]
    search_fields = ["external_id", "token"]
    show_full_result_count = False  # a second count of every subject: seconds in a big study
    list_select_related = ["study"]
    ordering = ["study", "ordinal"]
    readonly_fields = [
        "study",
        "ordinal",
        "token",
        "participant_link",
        "external_id",
        "meta",
        "created_at",
        "consented_at",
        "last_seen",
        "completed_at",
        "answered_of_total",
        "outcome",
        "catch_score_percent",
    ]
    inlines = [ResponseInline]

    # An answer being stored holds its subject's row: a deletion that locks the rows first
    # waits for it and deletes it with the rest; one that did not failed (PostgreSQL: a
    # foreign key broken by the new answer, or a deadlock) with a 500.

    def get_queryset(self, request):
        return with_progress(super().get_queryset(request))

    def has_add_permission(self, request):
        return False  # subjects are made with their plans: study links or the join link

    @admin.display(description="catch score", ordering="catch_score")
    def catch_score_percent(self, subject):
        return "" if subject.catch_score is None else f"{subject.catch_score:.0%}"

    @admin.display(description="answered")
    def answered_of_total(self, subject):
        return f"{subject.answered} / {subject.total}"

    @admin.display(description="participant link")
    def participant_link(self, subject):
        link = reverse("subject", args=[subject.token])
        return format_html('<a href="{}">{}</a>', link, link)
