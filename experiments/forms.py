"""Forms for the participant pages and the researchers' admin pages."""

import json
import os
from collections import defaultdict

from django import forms
from django.utils.text import get_valid_filename
from django.utils.translation import gettext_lazy as _

from engine.files import VIDEO_SUFFIXES

from .media import CLIP_S

MAX_RESPONSE_MS = 6 * 3600 * 1000  # beyond six hours a "response time" means nothing
MAX_BEHAVIOUR_CHARS = 4000


class AnswerForm(forms.Form):
    """One answer: which candidate, for which question, plus what the page's script measured.

    The script's fields are optional and parsed defensively: a value that makes no sense is
    stored as "unknown", never a reason to refuse the answer.
    """

    choice = forms.ChoiceField(choices=[("a", "A"), ("b", "B")])
    position = forms.IntegerField(min_value=1, max_value=32767)
    response_ms = forms.CharField(required=False)
    behaviour = forms.CharField(required=False, strip=False)

    def clean(self):
        # A browser sends one value of each (the clicked button's); two are not an answer.
        for name in ("choice", "position"):
            if hasattr(self.data, "getlist") and len(self.data.getlist(name)) > 1:
                raise forms.ValidationError(f"{name} was sent more than once")
        return super().clean()

    def clean_response_ms(self) -> int | None:
        raw = self.cleaned_data["response_ms"]
        if len(raw) > 12:
            return None
        try:
            value = int(raw)
        except ValueError:
            return None
        return value if 0 <= value <= MAX_RESPONSE_MS else None

    def clean_behaviour(self) -> dict:
        raw = self.cleaned_data["behaviour"]
        # PostgreSQL's jsonb refuses NUL characters.
        if not raw or len(raw) > MAX_BEHAVIOUR_CHARS or "\\u0000" in raw:
            return {}
        try:  # NaN/Infinity are not JSON that PostgreSQL accepts
            value = json.loads(raw, parse_constant=_reject)
        except (ValueError, RecursionError):
            return {}
        return value if isinstance(value, dict) else {}


def _reject(constant):
    raise ValueError(constant)


class StartForm(forms.Form):
    consent = forms.BooleanField(
        required=False, label=_("I have read the information above and agree to take part.")
    )

    def __init__(self, *args, require_consent: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["consent"].required = require_consent
        self.fields["consent"].error_messages["required"] = _(
            "Please tick the box to agree before you start."
        )


class SoundCheckForm(forms.Form):
    """The headphone check's answers: for each trial, which of the three tones was quietest."""

    def __init__(self, *args, trials: int, **kwargs):
        super().__init__(*args, **kwargs)
        for t in range(1, trials + 1):
            self.fields[f"t{t}"] = forms.TypedChoiceField(
                choices=[(s, str(s)) for s in (1, 2, 3)],
                coerce=int,
                widget=forms.RadioSelect,
                label=_("Sound %(number)s") % {"number": t},
                error_messages={"required": _("Please answer every question.")},
            )

    def answers(self) -> list[int]:
        return [self.cleaned_data[name] for name in self.fields]


# Subject links made in one request: about 20 s on a slow server (~0.1 s a subject with 124
# questions). 980 at once took 140 s: a proxy's timeout left them made and their CSV lost.
MAX_LINKS_AT_ONCE = 200


class SubjectLinksForm(forms.Form):
    count = forms.IntegerField(
        min_value=1,
        max_value=MAX_LINKS_AT_ONCE,
        initial=10,
        label="Number of new subject links",
        help_text=f"At most {MAX_LINKS_AT_ONCE} at a time: submit again for more (or run "
        "manage.py create_subjects STUDY --count N on the server). Every "
        "subject's link, these included, is in the download of every subject's link at the "
        "top of this page.",
    )
    base_url = forms.URLField(
        label="Site address",
        help_text="The public address participants use, e.g. https://study.example.org",
        assume_scheme="https",
    )


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput())
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        files = data if isinstance(data, list | tuple) else [data]
        return [super(MultipleFileField, self).clean(file, initial) for file in files]


class CollectionUploadForm(forms.Form):
    """A small collection uploaded through the admin: music videos, one pair each."""

    name = forms.CharField(max_length=200, label="Collection name (new or existing)")
    files = MultipleFileField(label="Music videos", help_text="One pair per file.")
    test = forms.IntegerField(
        min_value=0,
        required=False,
        label="Test pairs",
        help_text="How many pairs the study may ask about; empty: a fifth of them.",
    )
    clip_seconds = forms.FloatField(
        min_value=1.0,
        required=False,
        label="Clip length (s)",
        help_text=f"Each item is the centred clip of this length (a shorter video whole); "
        f"empty: {CLIP_S} s, or the collection's when it has pairs already. Music videos "
        "shorter than this: give the shortest one's length, so that every item lasts as long "
        "as the others.",
    )

    def __init__(self, *args, max_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes

    def clean_files(self):
        files = self.cleaned_data["files"]
        if sum(f.size for f in files) > self.max_bytes:
            raise forms.ValidationError(
                f"The files add up to more than {self.max_bytes // 2**20} MiB: "
                "import large collections with `manage.py import_collection`."
            )
        for f in files:
            if os.path.splitext(f.name)[1].lower() not in VIDEO_SUFFIXES:
                raise forms.ValidationError(f"{f.name}: not a video file.")
        names = defaultdict(list)
        for f in files:
            names[stored_name(f)].append(f.name)
        if clashes := [(name, given) for name, given in names.items() if len(given) > 1]:
            raise forms.ValidationError(
                "Files that would be stored under one name (one would replace the other): "
                + "; ".join(f"{', '.join(given)} as {name}" for name, given in clashes)
                + ". Rename them."
            )
        return files


def stored_name(upload) -> str:
    """The name an uploaded file is stored under (spaces and odd characters replaced)."""
    return get_valid_filename(upload.name)
