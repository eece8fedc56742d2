"""The page for a POST that fails Django's CSRF check (`settings.CSRF_FAILURE_VIEW`).

A participant meets it when the browser blocks this site's cookies (often because the study
is shown inside another site's frame, as MTurk does): the page says so in the study's
language and links back to the subject's page (a GET that sets the cookie again).
The other error pages are Django's own views with the templates in `templates/`.
"""

from django.conf import settings
from django.shortcuts import render
from django.urls import reverse
from django.utils import translation

from .models import Subject


def csrf_failure(request, reason=""):
    match = request.resolver_match  # set: the CSRF check runs on a resolved view
    context = {"reason": reason, "DEBUG": settings.DEBUG, "retry_url": ""}
    language = None
    if match is not None and match.url_name == "subject":
        token = match.kwargs["token"]
        language = (
            Subject.objects.filter(token=token).values_list("study__language", flat=True).first()
        )
        if language is not None:
            context["retry_url"] = reverse("subject", args=[token])
    with translation.override(language or translation.get_language()):
        return render(request, "403_csrf.html", context, status=403)
