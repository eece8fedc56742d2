"""Security: staff-only admin and exports, one subject per token, no ground truth in media,
security headers (production settings included), a CSP the participant pages' own JS passes,
and throttled logins."""

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.contrib import admin
from django.contrib.auth.models import User
from django.contrib.contenttypes.models import ContentType
from django.test import Client
from django.urls import URLResolver, reverse

from experiments.models import Pair, Question, Response, Subject
from tests.experiments.factories import make_study, make_subject, without_random_tokens

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parent.parent.parent
# The login form; logging out (harmless); a redirect to a model's public page (none has one).
PUBLIC_ADMIN_VIEWS = {"login", "logout", "view_on_site"}


def admin_views() -> list[tuple[str, list[str]]]:
    """(name, URL parameters) of every named view of the admin site, custom ones included."""
    views = []

    def walk(patterns):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns)
            elif pattern.name:
                regex = pattern.pattern.regex
                views.append((pattern.name, list(regex.groupindex)))

    walk(admin.site.get_urls())
    return views


def admin_urls(study) -> list[str]:
    values = {
        "object_id": str(study.pk),
        "id": str(study.pk),
        "study_id": study.pk,
        "app_label": "experiments",
        "content_type_id": ContentType.objects.get_for_model(study).pk,
    }
    return [
        reverse(f"admin:{name}", kwargs={p: values[p] for p in params})
        for name, params in admin_views()
        if name not in PUBLIC_ADMIN_VIEWS
    ]


@pytest.fixture
def study():
    study = make_study(per_type=1)
    subject = make_subject(study)
    client = Client()
    url = reverse("subject", args=[subject.token])
    client.post(url, {"step": "start"})
    client.post(url, {"choice": "a", "position": 1})
    return study


def test_every_admin_view_and_export_needs_a_staff_login(study):
    urls = admin_urls(study)
    names = {name for name, _ in admin_views()}
    # The walk finds the custom study pages and every model's views, not just a few.
    assert {
        "experiments_study_links",
        "experiments_study_links_csv",
        "experiments_study_responses",
        "experiments_study_results",
        "experiments_collection_upload",
        "experiments_subject_change",
        "experiments_pair_changelist",
    } <= names
    assert len(urls) >= 40

    member = Client()
    member.force_login(User.objects.create_user("visitor", password="not-staff-9283"))

    for who, client in (("logged out", Client()), ("not staff", member)):
        for url in urls:
            for method in ("get", "post"):
                response = getattr(client, method)(url)
                assert response.status_code == 302, (who, method, url)
                assert response["Location"].startswith(reverse("admin:login")), (who, url)
        # The study actions (exports among them) posted to the change list.
        for action in admin.site._registry[type(study)].actions:
            response = client.post(
                reverse("admin:experiments_study_changelist"),
                {"action": action, "_selected_action": [study.pk]},
            )
            assert response.status_code == 302, (who, action)
            assert response["Location"].startswith(reverse("admin:login"))
            assert b"," not in b"".join(getattr(response, "streaming_content", [response.content]))


def test_a_token_gives_access_to_its_own_subject_only(study):
    mine, theirs = study.subjects.first(), make_subject(study)
    client = Client()
    client.post(reverse("subject", args=[theirs.token]), {"step": "start"})
    page = client.get(reverse("subject", args=[mine.token])).content.decode()
    assert theirs.token not in page
    # Answering "their" current position through my link answers my question, never theirs.
    client.post(reverse("subject", args=[mine.token]), {"choice": "b", "position": 2})
    assert not Response.objects.filter(subject=theirs).exists()
    assert Response.objects.filter(subject=mine).count() == 2
    # Tokens are long and random; near misses are unknown.
    assert len(mine.token) >= 32 and mine.token != theirs.token
    assert Client().get(f"/s/{mine.token[:-1]}/").status_code == 404


def test_pages_and_media_do_not_reveal_the_ground_truth(study):
    subject = study.subjects.first()
    # Pairs imported one after another: each pair's two files share a time, unlike others'.
    for i, pair in enumerate(Pair.objects.filter(collection=study.collection)):
        for field in (pair.video_file, pair.music_file):
            os.utime(field.path, (1_600_000_000 + 3600 * i,) * 2)
    client = Client()
    url = reverse("subject", args=[subject.token])
    question = Question.objects.get(subject=subject, position=2)
    html = client.get(url).content.decode()
    assert 'name="position" value="2"' in html
    for pair in Pair.objects.all():
        assert pair.key not in html and pair.title not in html
    text = without_random_tokens(html, subject)  # a "-" in the link's token ends a word
    for word in ("data-kind", "pair_type", question.pair_type, "kind", "ground", "random"):
        assert not re.search(rf"\b{word}\b", text, re.IGNORECASE), word
    media = re.findall(r'src="(/m/[^"]+)"', html)
    assert len(media) == 3 and all(re.fullmatch(r"/m/[0-9a-f]{32}", m) for m in media)

    query, a, b = media
    headers = {}
    for name, link in (("query", query), ("a", a), ("b", b)):
        response = client.get(link)
        assert response.status_code == 200
        b"".join(response.streaming_content)
        headers[name] = dict(response.items())
    truth = "a" if question.kind_a == "G" else "b" if question.kind_b == "G" else None
    truth = truth or "a"  # an S-R question: no candidate may be tied to the query either
    other = "b" if truth == "a" else "a"
    for key, value in headers["query"].items():
        if headers[truth].get(key) == value:  # a shared value must be shared by all
            assert headers[other].get(key) == value, f"{key} ties the query to its ground truth"
    assert "Last-Modified" not in headers["query"]


def test_participant_pages_and_media_send_security_headers(study, settings):
    settings.SECURE_HSTS_SECONDS = 31536000  # as in production (checked below)
    subject = study.subjects.first()
    client = Client()
    page = client.get(reverse("subject", args=[subject.token]), secure=True)
    assert page["Strict-Transport-Security"].startswith("max-age=31536000")
    assert page["X-Content-Type-Options"] == "nosniff"
    assert page["Referrer-Policy"] == "same-origin"
    csp = page["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "object-src 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert_framable_by_mturk_only(page)
    token = re.search(r'src="/m/([0-9a-f]{32})"', page.content.decode())[1]
    medium = client.get(f"/m/{token}", secure=True)
    assert medium["X-Content-Type-Options"] == "nosniff"
    assert "Content-Security-Policy" in medium
    join = client.get(reverse("join", args=[study.join_token]), secure=True)
    assert "Content-Security-Policy" in join and join["Cache-Control"].startswith("max-age=0")


MTURK_ORIGINS = (
    "https://worker.mturk.com",
    "https://workersandbox.mturk.com",
    "https://www.mturk.com",
)


def frame_ancestors(response) -> list[str]:
    policy = response["Content-Security-Policy"]
    directive = [d.strip() for d in policy.split(";") if d.strip().startswith("frame-ancestors")]
    assert len(directive) == 1, policy
    return directive[0].split()[1:]


def assert_framable_by_mturk_only(response):
    """MTurk's ExternalQuestion shows the page in a frame on MTurk's sites: the CSP names
    those origins (and only those), and no X-Frame-Options DENY forbids every frame."""
    assert sorted(frame_ancestors(response)) == sorted(MTURK_ORIGINS)
    assert "X-Frame-Options" not in response


def assert_not_framable(response):
    assert response["X-Frame-Options"] == "DENY"
    if "Content-Security-Policy" in response:  # the admin sends none (inline styles)
        assert frame_ancestors(response) == ["'none'"]


def test_only_participant_pages_may_be_framed_by_mturk(study, admin_client):
    subject = study.subjects.first()
    client = Client()
    join = reverse("join", args=[study.join_token])
    participant = {
        "subject page": client.get(reverse("subject", args=[subject.token])),
        "MTurk preview": client.get(join + "?assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE&hitId=h"),
        "join (redirect)": client.get(join + "?workerId=w1&assignmentId=a1&hitId=h"),
        "mistyped link": client.get("/s/no-such-token/"),
        "mistyped join link": client.get("/join/no-such-token/"),
        "a refused answer": client.post(reverse("subject", args=[subject.token]), {"choice": "c"}),
    }
    assert participant["MTurk preview"].status_code == 200
    assert participant["mistyped link"].status_code == 404
    for name, response in participant.items():
        assert "Content-Security-Policy" in response, name
        assert_framable_by_mturk_only(response)
    elsewhere = Client().post(
        reverse("subject", args=[subject.token]), HTTP_ORIGIN="https://evil.example"
    )
    assert elsewhere.status_code == 403
    assert_framable_by_mturk_only(elsewhere)

    everything_else = {
        "admin login": Client().get(reverse("admin:login")),
        "admin index": admin_client.get(reverse("admin:index")),
        "admin study": admin_client.get(reverse("admin:experiments_study_change", args=[study.pk])),
        "admin redirect to login": Client().get(reverse("admin:index")),
        "home": client.get("/"),
        "another page": client.get("/no/such/page/"),
        "a look-alike path": client.get("/sx/"),
    }
    assert everything_else["admin index"].status_code == 200
    for name, response in everything_else.items():
        assert response["X-Frame-Options"] == "DENY", name
        assert_not_framable(response)
    assert "Content-Security-Policy" not in everything_else["admin index"]
    assert frame_ancestors(everything_else["home"]) == ["'none'"]


def test_participant_pages_can_keep_refusing_every_frame(study, settings):
    settings.PARTICIPANT_FRAME_ANCESTORS = []  # a site that recruits nowhere that frames it
    page = Client().get(reverse("subject", args=[study.subjects.first().token]))
    assert_not_framable(page)


def production(code: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DJANGO_ENV": "production",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_SETTINGS_MODULE": "study_site.settings",
    }
    env.pop("DEBUG", None)
    return subprocess.run(
        [sys.executable, *code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_production_settings_pass_the_deploy_check_and_harden_everything():
    check = production(["manage.py", "check", "--deploy", "--fail-level", "WARNING"])
    assert check.returncode == 0, check.stdout + check.stderr
    shown = production(
        [
            "-c",
            "import django, json; django.setup(); from django.conf import settings as s; "
            "print(json.dumps({k: getattr(s, k) for k in ['DEBUG', 'SECURE_HSTS_SECONDS', "
            "'SECURE_SSL_REDIRECT', 'SESSION_COOKIE_SECURE', 'CSRF_COOKIE_SECURE', "
            "'SECURE_CONTENT_TYPE_NOSNIFF', 'SECURE_REFERRER_POLICY', 'X_FRAME_OPTIONS', "
            "'SESSION_COOKIE_SAMESITE', 'CSRF_COOKIE_SAMESITE']}))",
        ]
    )
    values = json.loads(shown.stdout.strip().splitlines()[-1])
    assert values == {
        "DEBUG": False,
        "SECURE_HSTS_SECONDS": 31536000,
        "SECURE_SSL_REDIRECT": True,
        "SESSION_COOKIE_SECURE": True,
        "CSRF_COOKIE_SECURE": True,
        "SECURE_CONTENT_TYPE_NOSNIFF": True,
        "SECURE_REFERRER_POLICY": "same-origin",
        "X_FRAME_OPTIONS": "DENY",
        # First-party only: participant pages, framed by MTurk, need no cookie.
        "SESSION_COOKIE_SAMESITE": "Lax",
        "CSRF_COOKIE_SAMESITE": "Lax",
    }


def test_logins_are_locked_after_repeated_failures(settings):
    User.objects.create_superuser("boss", password="the-right-one-4821")
    client = Client(REMOTE_ADDR="203.0.113.9")
    login = reverse("admin:login")
    statuses = [
        client.post(login, {"username": "boss", "password": "wrong"}).status_code
        for _ in range(settings.AXES_FAILURE_LIMIT)
    ]
    # The form again with its error, until the last allowed failure locks the login.
    assert statuses == [200] * (settings.AXES_FAILURE_LIMIT - 1) + [429]
    locked = client.post(login, {"username": "boss", "password": "the-right-one-4821"})
    assert locked.status_code == 429
    assert "_auth_user_id" not in client.session
    assert client.get(reverse("admin:index")).status_code == 302  # still not in
    # Another address is not locked out by this one's failures.
    other = Client(REMOTE_ADDR="198.51.100.7")
    assert (
        other.post(login, {"username": "boss", "password": "the-right-one-4821"}).status_code == 302
    )


# --- The participant pages' own JS under the CSP, in real Chromium -------------------------


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_participant_pages_run_their_scripts_without_csp_violations(live_server, chromium):
    from tests.experiments.test_browser import answerable, wait_for_media

    study = make_study(per_type=1)
    subject = make_subject(study)
    violations, errors = [], []
    page = chromium.new_page()
    page.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation',"
        " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(f"{live_server.url}/s/{subject.token}/")
    assert page.locator("html").get_attribute("class") == "js"  # study.js ran
    violations += page.evaluate("window.__csp")
    page.get_by_role("button", name="Start").click()
    page.locator("#counter").wait_for()
    wait_for_media(page, state=1)
    answerable(page)
    page.keyboard.press("a")  # the keyboard handler is the page's own JS
    page.locator("#counter", has_text="Question 2 of").wait_for()
    time.sleep(0.2)
    violations += page.evaluate("window.__csp")
    assert page.locator("html").get_attribute("class") == "js"
    assert violations == [] and errors == []
    assert Response.objects.filter(subject=subject).count() == 1
    assert Subject.objects.get(pk=subject.pk).consented_at is not None
