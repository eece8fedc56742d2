"""The admin's power planning page: how many subjects a study needs, before paying for them.

`<study id>/power/` starts from the study's design (its comparisons, its test pairs as query
items, 2 × per_type questions of each comparison per subject); `power/` (linked from the add
form) starts blank. Both call `analysis.power.plan_power`, with few enough simulations to
answer in a second or two; `manage.py plan_power` runs more for a final answer.
"""

from django import forms
from django.contrib import admin
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse

from analysis.power import plan_power

from .models import Pair, Split, Study
from .plans import default_comparisons, pair_type_name

# The plan's inputs and their bounds, (lowest, highest) inclusive, None: no bound; for this
# form and `manage.py plan_power` alike. The form caps sims and max_subjects further (ADMIN_MAX)
# to answer quickly.
LIMITS = {
    "effect": (0.01, 0.99),
    "items": (2, None),
    "questions_per_subject": (1, None),
    "subject_sd": (0.0, None),
    "item_sd": (0.0, None),
    "alpha": (0.0001, 0.5),
    "sims": (20, None),
    "max_subjects": (4, None),
}
ADMIN_MAX = {"sims": 1000, "max_subjects": 2000}
SAME_ITEM_ONCE = "A subject sees each query item at most once."


def _bounds(name: str) -> dict:
    low, high = LIMITS[name]
    return {"min_value": low, "max_value": ADMIN_MAX.get(name, high)}


class PowerForm(forms.Form):
    comparison = forms.CharField(max_length=20, initial="GS", help_text="e.g. GS or S1-S2")
    effect = forms.FloatField(
        **_bounds("effect"),
        initial=0.56,
        help_text="Expected preference for the first-named kind (0.56 = 56%)",
    )
    items = forms.IntegerField(
        **_bounds("items"), initial=100, help_text="Query items (test pairs)"
    )
    questions_per_subject = forms.IntegerField(
        **_bounds("questions_per_subject"),
        initial=40,
        help_text="Questions of this comparison each subject answers",
    )
    subject_sd = forms.FloatField(
        **_bounds("subject_sd"), initial=0.5, help_text="Spread of subjects (log-odds)"
    )
    item_sd = forms.FloatField(
        **_bounds("item_sd"), initial=0.5, help_text="Spread of items (log-odds)"
    )
    sims = forms.IntegerField(**_bounds("sims"), initial=200, label="Simulations")
    max_subjects = forms.IntegerField(**_bounds("max_subjects"), initial=500)

    def clean(self):
        data = super().clean()
        if data.get("questions_per_subject", 0) > data.get("items", 0) > 0:
            self.add_error("questions_per_subject", SAME_ITEM_ONCE)
        return data


def study_design(study: Study) -> dict:
    """The form's starting values from a study: its first comparison, items, questions."""
    labels = sorted(study.studysystem_set.values_list("label", flat=True)) or ["S"]
    comparisons = [pair_type_name(tuple(c)) for c in study.comparisons] or [
        pair_type_name(c) for c in default_comparisons(labels)
    ]
    items = Pair.objects.filter(
        collection=study.collection_id, split=Split.TEST, status=Pair.Status.READY
    ).count()
    first_system = next((c for c in comparisons if c not in ("GR", "G-R")), comparisons[0])
    return {
        "comparison": first_system,
        "items": max(items, 2),
        "questions_per_subject": max(1, min(2 * study.per_type, items)),
        "comparisons": comparisons,
    }


@staff_member_required
def study_power(request, study_id=None):
    study = get_object_or_404(Study, pk=study_id) if study_id is not None else None
    if not request.user.has_perm("experiments.view_study"):
        raise PermissionDenied
    design = study_design(study) if study else {}
    form = PowerForm(request.GET if "effect" in request.GET else None, initial=design)
    plan = None
    if form.is_valid():
        o = form.cleaned_data
        plan = plan_power(
            o["effect"],
            o["items"],
            o["questions_per_subject"],
            n_subjects_grid=range(2, o["max_subjects"] + 1),
            sims=o["sims"],
            subject_sd=o["subject_sd"],
            item_sd=o["item_sd"],
        )
    context = {
        **admin.site.each_context(request),
        "title": f"Power planning for {study}" if study else "Power planning",
        "study": study,
        "comparisons": design.get("comparisons", []),
        "form": form,
        "plan": plan,
        "needed": [(round(100 * t), n) for t, n in plan.needed.items()] if plan else [],
        "opts": Study._meta,
    }
    return TemplateResponse(request, "admin/experiments/study/power.html", context)
