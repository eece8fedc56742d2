"""The page for a POST that fails Django's CSRF check (`settings.CSRF_FAILURE_VIEW`): an
admin form sent without its cookie. Participant pages need no cookie (their link's token is
the credential) and are not checked. The other error pages are Django's own views with the
templates in `templates/`.
"""

from django.conf import settings
from django.shortcuts import render


def csrf_failure(request, reason=""):
    context = {"reason": reason, "DEBUG": settings.DEBUG, "retry_url": ""}
    return render(request, "403_csrf.html", context, status=403)
