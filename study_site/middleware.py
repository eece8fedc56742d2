"""Security headers that Django's SecurityMiddleware does not set, and the page for a
database that cannot be reached."""

import functools
import logging

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpResponse
from django.template import loader
from django.urls import reverse

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 10  # the 503 page reloads itself after this long

# Participant pages use only their own static JS and CSS; media come from this origin.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "media-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self' https:",
        "frame-ancestors 'none'",
    ]
)


def content_security_policy(frame_ancestors: list[str]) -> str:
    """The policy, with `frame-ancestors` naming who may frame the page ('none': nobody)."""
    if not frame_ancestors:
        return CONTENT_SECURITY_POLICY
    return CONTENT_SECURITY_POLICY.replace(
        "frame-ancestors 'none'", "frame-ancestors " + " ".join(frame_ancestors)
    )


@functools.cache
def participant_prefixes() -> tuple[str, ...]:
    """The paths under which participant pages live: a subject's page and the join link."""
    return tuple(reverse(name, args=["-"]).removesuffix("-/") for name in ("subject", "join"))


class ContentSecurityPolicyMiddleware:
    """Adds a Content-Security-Policy to every page outside the Django admin.

    The admin is excluded because its widgets rely on inline styles; it is staff-only.

    Participant pages (`/s/…`, `/join/…`, their error pages included) may be framed by
    `settings.PARTICIPANT_FRAME_ANCESTORS` (MTurk's ExternalQuestion shows the study in a
    frame on MTurk's sites). X-Frame-Options cannot name origins, so those pages go without
    it and rely on the CSP's `frame-ancestors`; every other page, the admin's above all,
    keeps X-Frame-Options DENY (XFrameOptionsMiddleware) and `frame-ancestors 'none'`.
    """

    def __init__(self, get_response):
        self.get_response = get_response
        self.admin_prefix = "/" + settings.ADMIN_URL_PREFIX

    def __call__(self, request):
        response = self.get_response(request)
        if request.path.startswith(self.admin_prefix):
            return response
        ancestors = settings.PARTICIPANT_FRAME_ANCESTORS
        if ancestors and request.path.startswith(participant_prefixes()):
            response.xframe_options_exempt = True
        else:
            ancestors = []
        response.headers.setdefault("Content-Security-Policy", content_security_policy(ancestors))
        return response


class DatabaseUnavailableMiddleware:
    """A database that cannot be reached (restarting, down, locked beyond its timeout) answers
    503 with Retry-After instead of 500: the question page's script sends an answer again
    after a 503 for about 15 s, and this page reloads itself, so a short outage costs a
    participant nothing. The page needs no database to render."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        if not isinstance(exception, (OperationalError, InterfaceError)):
            return None
        logger.error("database unavailable: %s %s: %s", request.method, request.path, exception)
        page = loader.render_to_string("503.html", {"retry_after_s": RETRY_AFTER_S})
        response = HttpResponse(page, status=503)
        response["Retry-After"] = str(RETRY_AFTER_S)
        return response
