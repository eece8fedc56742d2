"""Error pages a participant can meet (a mistyped link, a browser that blocks cookies, a
server error): the site's own short pages, in the study's language where a study is known,
under the same CSP as every participant page (no inline script or style)."""

import gettext
import re

import pytest
from django.conf import settings
from django.template import loader
from django.test import Client, RequestFactory
from django.urls import reverse
from django.utils import translation
from django.views import defaults

from experiments.models import Response

from .factories import make_study, make_subject

pytestmark = pytest.mark.django_db
ERROR_TEMPLATES = ("400.html", "403.html", "403_csrf.html", "404.html", "500.html", "503.html")


def assert_participant_page(html: str, language: str = "en"):
    """The participant base page (own stylesheet and script), nothing the CSP would block."""
    assert f'<html lang="{language}"' in html
    assert "experiments/study.css" in html and "experiments/study.js" in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html, re.IGNORECASE), "inline style"
    # Not Django's bare English pages.
    for bare in ("The requested resource was not found", "<h1>Server Error (500)</h1>"):
        assert bare not in html
    assert "CSRF verification failed" not in html


def test_a_mistyped_link_gets_a_friendly_not_found_page():
    for path in ("/s/not-a-real-token/", f"/join/{'x' * 20}/", "/no/such/page/"):
        response = Client().get(path)
        assert response.status_code == 404, path
        html = response.content.decode()
        assert_participant_page(html)
        assert "Page not found" in html and "check that you copied the whole link" in html


def test_the_not_found_page_follows_the_browser_language():
    response = Client(headers={"accept-language": "de"}).get("/s/not-a-real-token/")
    html = response.content.decode()
    assert response.status_code == 404
    assert_participant_page(html, "de")
    assert "Seite nicht gefunden" in html and "Page not found" not in html


def test_the_home_page_is_a_participant_page_in_the_browser_language():
    for language, text in (("en", "please open the link you were given"), ("de", "Link")):
        response = Client(headers={"accept-language": language}).get("/")
        html = response.content.decode()
        assert response.status_code == 200 and text in html
        assert_participant_page(html, language)


@pytest.mark.parametrize("language", ["en", "de"])
def test_the_server_error_page_needs_no_request_context(language):
    # As Django renders it: the template alone, with an empty context.
    with translation.override(language):
        html = loader.get_template("500.html").render()
        response = defaults.server_error(RequestFactory().get("/s/x/"))
    assert response.status_code == 500 and response.content.decode() == html
    assert_participant_page(html, language)
    expected = "Something went wrong" if language == "en" else "Etwas ist schiefgelaufen"
    assert expected in html


def test_bad_request_and_forbidden_pages_are_the_sites_own():
    request = RequestFactory().get("/s/x/")
    with translation.override("en"):  # as LocaleMiddleware would have activated it
        bad = defaults.bad_request(request, Exception("bad"))
        forbidden = defaults.permission_denied(request, Exception("no"))
    assert bad.status_code == 400
    assert_participant_page(bad.content.decode())
    assert "could not be understood" in bad.content.decode()
    assert "Back to the study" not in bad.content.decode()
    # A view that knows the subject can offer the way back, in the study's language.
    with translation.override("de"):
        html = loader.get_template("400.html").render({"retry_url": "/s/abc/"})
    assert_participant_page(html, "de")
    assert 'href="/s/abc/"' in html and "Zurück zur Studie" in html
    assert forbidden.status_code == 403
    assert_participant_page(forbidden.content.decode())
    assert "not allowed" in forbidden.content.decode()


def test_a_browser_without_cookies_takes_part_and_an_admin_form_without_one_says_so():
    """Inside MTurk's frame the site is third-party, and Safari or a private window keeps no
    cookie of it: the participant pages need none."""
    subject = make_subject(make_study(per_type=1))
    url = reverse("subject", args=[subject.token])
    client = Client(enforce_csrf_checks=True)
    client.get(url)
    client.cookies.clear()  # the browser blocks cookies
    assert client.post(url, {"step": "start"}, HTTP_ORIGIN="http://testserver").status_code == 302
    assert client.post(url, {"choice": "a", "position": 1}).status_code == 302
    assert Response.objects.filter(subject=subject).count() == 1
    response = client.post(reverse("admin:login"), {"username": "x", "password": "y"})
    assert response.status_code == 403 and "allow cookies" in response.content.decode()


def test_error_pages_are_in_the_german_catalogue():
    with open(settings.BASE_DIR / "locale/de/LC_MESSAGES/django.mo", "rb") as mo:
        catalogue = gettext.GNUTranslations(mo)._catalog
    strings = set()
    for name in ERROR_TEMPLATES:
        text = (settings.BASE_DIR / "templates" / name).read_text()
        strings |= set(re.findall(r'{% translate "([^"]+)" %}', text))
    assert len(strings) >= 8
    assert sorted(s for s in strings if not catalogue.get(s)) == []


@pytest.mark.parametrize(("language", "says"), [("en", "Back to the study"), ("de", None)])
def test_an_answer_that_is_not_a_or_b_gets_the_study_language_page(language, says):
    subject = make_subject(make_study(per_type=1, language=language))
    client = Client()
    page = reverse("subject", args=[subject.token])
    client.post(page, {"step": "start"})
    response = client.post(page, {"choice": "c", "position": 1})
    html = response.content.decode()
    assert response.status_code == 400
    assert_participant_page(html, language)
    assert f'href="{page}"' in html  # back to the subject's page
    if says:
        assert says in html
    else:
        assert "Request not understood" not in html
    assert not subject.responses.exists()
