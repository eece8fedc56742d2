"""The study platform's data: collections of pairs, retrieval systems, studies, plans, answers.

A *pair* is one music video: its muted picture is the video item, its soundtrack the music
item. A *system* is one retrieval system under study (an engine model trained or loaded here,
a baseline, or results a researcher uploaded); a study compares one or more systems with
people. Candidate kinds are 'G' (the query's ground truth), 'R' (random), a system's label
('S' in a one-system study, 'S1', 'S2', … otherwise) or 'X' (the deliberately broken media of
a catch question: a pair of split 'catch' whose picture is black and whose sound is silent).
"""

import os
import secrets
import shutil
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.db.models import Q
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import receiver

from .plans import label_problem


def new_token() -> str:
    """An unguessable URL-safe token (192 bits) that does not start with "-": CSV exports
    quote such a cell (a spreadsheet would run it as a formula), and a quoted token no longer
    names its subject."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def validate_system_label(label: str) -> None:
    if problem := label_problem(label):
        raise ValidationError(problem)


def new_media_token() -> str:
    """Opaque media id: says nothing about the pair, the modality or the item's role."""
    return secrets.token_hex(16)


class Direction(models.TextChoices):
    V2M = "V2M", "video → music"
    M2V = "M2V", "music → video"


class Split(models.TextChoices):
    TRAIN = "train", "train"
    VAL = "val", "validation"
    TEST = "test", "test"
    CATCH = "catch", "catch (deliberately broken media for attention checks)"


class Collection(models.Model):
    name = models.CharField(max_length=200, unique=True)
    source = models.CharField(
        max_length=1000, blank=True, help_text="Folder or manifest imported from"
    )
    # Its first import's clip length, encoder and frame size (`ingest.import_settings`):
    # every pair is made alike, so that its items and features compare.
    import_settings = models.JSONField(default=dict, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return self.name


class Pair(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        READY = "ready"
        FAILED = "failed"

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="pairs")
    key = models.CharField(
        max_length=300,
        help_text="Stable name from the source (the file's path in the folder, without suffix)",
    )
    title = models.CharField(max_length=300, blank=True)
    genre = models.CharField(max_length=100, blank=True)
    split = models.CharField(max_length=5, choices=Split.choices, default=Split.TRAIN)
    source_video = models.CharField(max_length=1000, blank=True)
    source_music = models.CharField(max_length=1000, blank=True)
    video_file = models.FileField(upload_to="items/", blank=True)  # muted web video
    music_file = models.FileField(upload_to="items/", blank=True)  # audio clip
    video_token = models.CharField(max_length=32, unique=True, default=new_media_token)
    music_token = models.CharField(max_length=32, unique=True, default=new_media_token)
    features_file = models.FileField(upload_to="features/", blank=True)  # npz: music, frames
    duration_s = models.FloatField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    error = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["collection", "key"], name="pair_key_unique"),
        ]
        indexes = [models.Index(fields=["collection", "split", "status"])]
        ordering = ["collection", "key"]

    def __str__(self):
        return f"{self.collection}/{self.key}"


class System(models.Model):
    """A retrieval system: an engine model (VM-NET or a baseline) or uploaded results."""

    class Kind(models.TextChoices):
        VMNET = "vmnet", "VM-NET"
        CCA = "cca", "CCA"
        PCA = "pca", "PCA"
        PLSSVD = "plssvd", "PLSSVD"
        PLS = "pls", "PLS-canonical"
        EXTERNAL = "external", "uploaded results"

    class Status(models.TextChoices):
        NEW = "new"
        RUNNING = "running"
        READY = "ready"
        FAILED = "failed"

    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="systems")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.VMNET)
    config = models.JSONField(default=dict, blank=True)
    checkpoint = models.FileField(upload_to="systems/", blank=True)
    embeddings = models.FileField(upload_to="systems/", blank=True)  # npz: keys, video, music
    source_file = models.FileField(
        upload_to="uploads/", blank=True, help_text="Uploaded results or embeddings"
    )
    metrics = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.NEW)
    progress = models.FloatField(default=0.0)
    message = models.TextField(blank=True)
    progress_at = models.DateTimeField(null=True, editable=False)  # its work's last report
    # Counts the changes of kind, settings or collection: a task that began before one stops.
    generation = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["collection", "name"], name="system_name_unique"),
        ]

    def __str__(self):
        return f"{self.name} ({self.get_kind_display()})"

    def forget_training(self) -> None:
        """Drop what was trained and searched for its earlier kind, settings or collection
        (checkpoint, embeddings, results, metrics): the next preparation trains it afresh.
        An upload's source file stays, for the record; its results go with the rest."""
        _delete_files_on_commit([self.checkpoint, self.embeddings])
        self.results.all().delete()
        self.checkpoint.name = self.embeddings.name = ""
        self.metrics, self.status, self.progress = {}, self.Status.NEW, 0.0
        self.message, self.progress_at = "", None
        self.generation += 1
        self.save()

    def clean(self):
        from engine.pipeline import check_config

        if self.kind != self.Kind.EXTERNAL:
            try:
                check_config(self.config if self.config is not None else {})
            except ValueError as error:
                raise ValidationError({"config": str(error)}) from error


class SearchResult(models.Model):
    """Rank `rank` (1 = best) of `system` for `query`'s item in `direction`."""

    system = models.ForeignKey(System, on_delete=models.CASCADE, related_name="results")
    direction = models.CharField(max_length=3, choices=Direction.choices)
    query = models.ForeignKey(Pair, on_delete=models.CASCADE, related_name="+")
    rank = models.PositiveSmallIntegerField()
    result = models.ForeignKey(Pair, on_delete=models.CASCADE, related_name="+")
    score = models.FloatField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["system", "direction", "query", "rank"], name="result_rank_unique"
            ),
            models.CheckConstraint(condition=Q(rank__gte=1), name="result_rank_positive"),
        ]
        ordering = ["system", "direction", "query", "rank"]


class Study(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft"
        PREPARING = "preparing"
        READY = "ready"
        OPEN = "open"
        CLOSED = "closed"
        FAILED = "failed"

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    collection = models.ForeignKey(Collection, on_delete=models.PROTECT, related_name="studies")
    systems = models.ManyToManyField(System, through="StudySystem", related_name="studies")
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DRAFT)
    progress = models.FloatField(default=0.0)
    message = models.TextField(blank=True)
    progress_at = models.DateTimeField(null=True, editable=False)  # its preparation's last report
    # Counts the preparations: a chain of tasks writes to the study only while its own is
    # the one at work (not after "Back to draft", nor once the study is prepared again).
    preparation = models.PositiveIntegerField(default=0, editable=False)
    # Plan configuration
    per_type = models.PositiveSmallIntegerField(
        default=20,
        validators=[MinValueValidator(1)],
        help_text="Questions per pair type and direction",
    )
    comparisons = models.JSONField(
        default=list,
        blank=True,
        help_text='Pair types to ask, e.g. [["G","R"],["G","S"],["S","R"]]; empty = the default for the systems',
    )
    seed = models.PositiveIntegerField(default=0)
    # Participant pages
    language = models.CharField(
        max_length=10,
        default="en",
        choices=settings.LANGUAGES,
        help_text="Of the participant pages",
    )
    instructions = models.TextField(blank=True)
    consent_text = models.TextField(blank=True)
    require_consent = models.BooleanField(default=False)
    play_before_answer = models.BooleanField(default=False)
    completion_code = models.CharField(
        max_length=100, blank=True,
        help_text="Shown to those who finish (and put in the redirect URL's {code})",
    )  # fmt: skip
    redirect_url = models.URLField(max_length=500, blank=True)
    external_id_param = models.CharField(max_length=50, default="PROLIFIC_PID", blank=True)
    min_listen_ms = models.PositiveIntegerField(
        default=0, help_text="With play-before-answer: how long each candidate must have played"
    )
    # Crowd-sourcing checks
    attention_checks = models.BooleanField(default=False, help_text="Insert catch questions")
    catch_count = models.PositiveSmallIntegerField(default=4)
    catch_pass_threshold = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="Share of catch questions a subject must pass, 0 to 1 (e.g. 0.75)",
    )
    sound_check = models.BooleanField(
        default=False, help_text="Headphone/sound check before the first question"
    )
    failed_attention_code = models.CharField(
        max_length=100, blank=True,
        help_text="For those who finish but fail the attention checks; empty: they get the "
        "completion code, and a platform that checks codes would approve them",
    )  # fmt: skip
    failed_sound_code = models.CharField(
        max_length=100, blank=True,
        help_text="For those who fail the sound check; empty: no code (tell them in the "
        "instructions what to do, e.g. return the study on Prolific)",
    )  # fmt: skip
    no_consent_code = models.CharField(
        max_length=100, blank=True, help_text="For those who decline consent; empty: no code"
    )
    join_token = models.CharField(max_length=64, unique=True, default=new_token)
    join_cap = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Max subjects from the join link; those who declined consent, failed the "
        "sound check or have not started 30 minutes after joining do not count",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "studies"

    def __str__(self):
        return self.name


class StudySystem(models.Model):
    study = models.ForeignKey(Study, on_delete=models.CASCADE)
    system = models.ForeignKey(System, on_delete=models.PROTECT)
    label = models.CharField(
        max_length=10,
        default="S",
        validators=[validate_system_label],
        help_text="'S' for one system, else S1, S2, … (G, R and X are reserved)",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["study", "label"], name="study_label_unique"),
            models.UniqueConstraint(fields=["study", "system"], name="study_system_unique"),
        ]


class Subject(models.Model):
    class Outcome(models.TextChoices):
        ACTIVE = "", "in progress"
        COMPLETED = "completed"
        FAILED_ATTENTION = "failed_attention", "failed the attention checks"
        FAILED_SOUND = "failed_sound", "failed the sound check"
        NO_CONSENT = "no_consent", "did not consent"

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="subjects")
    token = models.CharField(max_length=64, unique=True, default=new_token)
    ordinal = models.PositiveIntegerField(help_text="Index within the study (rotates pair types)")
    external_id = models.TextField(blank=True)
    meta = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    consented_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=20, choices=Outcome.choices, default="", blank=True)
    catch_score = models.FloatField(
        null=True, blank=True, help_text="Share of catch questions passed"
    )
    last_seen = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["study", "ordinal"], name="subject_ordinal_unique"),
        ]

    def __str__(self):
        return f"{self.study.slug} #{self.ordinal}"


class Question(models.Model):
    subject = models.ForeignKey(Subject, on_delete=models.CASCADE, related_name="questions")
    position = models.PositiveSmallIntegerField(help_text="1-based")
    direction = models.CharField(max_length=3, choices=Direction.choices)
    pair_type = models.CharField(max_length=20, help_text="e.g. GR, GS, SR, S1-S2")
    query = models.ForeignKey(Pair, on_delete=models.PROTECT, related_name="+")
    option_a = models.ForeignKey(Pair, on_delete=models.PROTECT, related_name="+")
    option_b = models.ForeignKey(Pair, on_delete=models.PROTECT, related_name="+")
    kind_a = models.CharField(max_length=10)
    kind_b = models.CharField(max_length=10)
    is_catch = models.BooleanField(
        default=False, help_text="Attention check: G against broken media ('X')"
    )
    machine = models.JSONField(
        default=dict, blank=True, help_text="Machine judges: label → 'a'|'b'"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["subject", "position"], name="question_position_unique"
            ),
            models.CheckConstraint(
                condition=~Q(option_a=models.F("option_b")), name="options_differ"
            ),
        ]
        ordering = ["subject", "position"]


class Response(models.Model):
    question = models.OneToOneField(Question, on_delete=models.CASCADE, related_name="response")
    subject = models.ForeignKey(Subject, on_delete=models.CASCADE, related_name="responses")
    choice = models.CharField(max_length=1, choices=[("a", "A"), ("b", "B")])
    chosen_kind = models.CharField(max_length=10)
    response_ms = models.PositiveIntegerField(null=True, blank=True)
    behaviour = models.JSONField(default=dict, blank=True)
    answered_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(choice__in=["a", "b"]), name="choice_a_or_b")
        ]


# A study's design can change until it is prepared for good: while it is a draft, ready (a
# change sends it back to draft: prepare again) or failed, and has no subjects. Preparation
# checked it, and subjects' stored plans are made from it, so later changes would mix designs.
EDITABLE_DESIGN = (Study.Status.DRAFT, Study.Status.READY, Study.Status.FAILED)


def design_locked(study: Study | None) -> bool:
    if study is None or study.pk is None:
        return False
    return study.status not in EDITABLE_DESIGN or study.subjects.exists()


def locking_studies(system: System) -> list[Study]:
    """The studies using `system` whose design is locked: the system is part of it."""
    return [study for study in system.studies.order_by("pk") if design_locked(study)]


# Files go with their rows: a deleted collection (its pairs), pair or system leaves no items,
# features, checkpoints or uploads behind under MEDIA_ROOT. Removed once the deletion is
# committed, so that a deletion rolled back keeps them.
UPLOADS = "uploads"  # MEDIA_ROOT's folder of admin uploads: a collection's own source files


def _delete_files_on_commit(files) -> None:
    names = [(f.storage, f.name) for f in files if f]
    transaction.on_commit(lambda: [storage.delete(name) for storage, name in names])


@receiver(post_delete, sender=Pair)
def _pair_files(sender, instance: Pair, **kwargs):
    _delete_files_on_commit([instance.video_file, instance.music_file, instance.features_file])


@receiver(post_delete, sender=System)
def _system_files(sender, instance: System, **kwargs):
    _delete_files_on_commit([instance.checkpoint, instance.embeddings, instance.source_file])


@receiver(pre_delete, sender=Collection)
def _uploaded_sources(sender, instance: Collection, **kwargs):
    """The admin uploads' folders of the collection's sources (never a folder the researcher
    imported from); read before its pairs go."""
    uploads = (Path(settings.MEDIA_ROOT) / UPLOADS).resolve()
    sources = [instance.source]
    for video, music in instance.pairs.values_list("source_video", "source_music"):
        sources += [video, music]
    paths = [Path(source).resolve() for source in sources if source]
    folders = {
        uploads / path.relative_to(uploads).parts[0]
        for path in paths
        if path.is_relative_to(uploads) and path != uploads
    }
    transaction.on_commit(lambda: [_remove_unused(folder) for folder in folders])


def _remove_unused(folder: Path) -> None:
    """Remove an upload folder that no collection names any more (a collection imported anew
    from another's upload, to split it anew, reads the same files)."""
    names = {str(folder), str(Path(settings.MEDIA_ROOT) / UPLOADS / folder.name)}  # as stored
    in_folder = {field: Q() for field in ("source", "source_video", "source_music")}
    for name in names:
        for field in in_folder:
            in_folder[field] |= Q(**{f"{field}__startswith": name + os.sep})
    if Collection.objects.filter(Q(source__in=names) | in_folder["source"]).exists():
        return
    if Pair.objects.filter(in_folder["source_video"] | in_folder["source_music"]).exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
