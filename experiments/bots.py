"""Bots: simulated participants that take a study through its real pages, over HTTP.

As with oTree's bots, a researcher runs them before launch (`manage.py run_bots`) to walk
every step a person will (join link with a Prolific-style id, welcome and consent, sound
check, questions, breaks, the end page) and to watch the analysis fill; the tests use the
same bots. A bot reads each page's form and submits it as a browser would (participant pages
need no cookie or CSRF token: the link's token is the credential). To answer, it looks its
question up in the database, which a person cannot do:

- `random`: either candidate, by a seeded coin;
- `ground-truth`: the query's own item where one is shown (G-R, G-S, catch questions),
  else random;
- `machine`: the candidate the study's (first) system prefers, else as `ground-truth`.

Catch questions are answered correctly by `ground-truth` and `machine` bots and at random by
`random` ones; every bot hears the sound check's quiet tone.
"""

import json
import secrets
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import numpy as np
import requests

from experiments.checks import QUIET
from experiments.models import Question, Study, Subject

STRATEGIES = ("random", "ground-truth", "machine")
BOT_PREFIX = "bot-"


@dataclass
class BotRun:
    subject: Subject
    answers: int
    outcome: str
    code: str


class BotError(RuntimeError):
    """A page did not behave as a participant's browser expects."""


def run_bots(
    study: Study,
    base_url: str,
    subjects: int = 1,
    strategy: str = "random",
    seed: int | None = None,
    timeout: float = 30.0,
) -> list[BotRun]:
    """Let `subjects` new bots take `study` at `base_url`; each joins through the study's
    public link with its own external id (prefixed 'bot-', so they can be told apart)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    rng = np.random.default_rng(seed)
    try:
        return [run_bot(study, base_url, strategy, rng, timeout) for _ in range(subjects)]
    except requests.ConnectionError as error:
        raise BotError(
            f"The site at {base_url} cannot be reached (is the server running?)"
        ) from error
    except requests.Timeout as error:
        raise BotError(f"The site at {base_url} did not answer within {timeout:g} s") from error
    except requests.RequestException as error:  # e.g. not a URL
        raise BotError(f"Cannot use the site at {base_url}: {error}") from error


def run_bot(
    study: Study, base_url: str, strategy: str, rng: np.random.Generator, timeout: float = 30.0
) -> BotRun:
    session = requests.Session()
    session.headers["User-Agent"] = "study-bot/1 (+run_bots)"
    param = study.external_id_param or "PROLIFIC_PID"
    entry = {param: BOT_PREFIX + secrets.token_hex(6)}
    if param == "PROLIFIC_PID":
        entry |= {"STUDY_ID": f"bot-{study.slug}", "SESSION_ID": secrets.token_hex(6)}
    join = urljoin(base_url.rstrip("/") + "/", f"join/{study.join_token}/")
    page = _checked(session.get(join, params=entry, timeout=timeout))
    token = urlparse(page.url).path.rstrip("/").rsplit("/", 1)[-1]
    subject = Subject.objects.filter(token=token, study=study).first()
    if subject is None:
        form = _form(page.text)
        message = "the study is full or closed" if form is None else f"landed on {page.url}"
        raise BotError(f"Could not join {study.slug}: {message}")
    answers = 0
    first_system = study.studysystem_set.order_by("label").values_list("label", flat=True).first()
    limit = 3 * subject.questions.count() + 10  # every step a page; a stuck page ends the run
    for _ in range(limit):
        form = _form(page.text)
        if form is None:  # the end (done, ended or closed): nothing left to submit
            break
        data = {**form.hidden}
        if "choice" in form.buttons:
            position = int(form.hidden["position"])
            question = subject.questions.get(position=position)
            data |= {
                "choice": _choose(question, strategy, rng, first_system),
                "response_ms": str(int(rng.integers(1500, 6000))),
                "behaviour": _behaviour(strategy, rng),
            }
            answers += 1
        elif "sound" in form.buttons.get("step", ()):
            subject.refresh_from_db()
            trials = subject.meta["sound_check"]["trials"]
            data |= {f"t{t}": trial.index(QUIET) + 1 for t, trial in enumerate(trials, start=1)}
            data["step"] = "sound"
        elif "start" in form.buttons.get("step", ()):
            data |= {"step": "start", **({"consent": "1"} if "consent" in form.checkboxes else {})}
        elif "step" not in data:
            raise BotError(f"{page.url}: a form the bot does not know: {form}")
        page = _checked(session.post(urljoin(page.url, form.action), data=data, timeout=timeout))
    else:
        raise BotError(f"{page.url}: still not at the end after {limit} pages")
    subject.refresh_from_db()
    code = _CodeParser.find(page.text)
    return BotRun(subject, answers, subject.outcome, code)


def _choose(
    question: Question, strategy: str, rng: np.random.Generator, system: str | None = None
) -> str:
    kinds = {"a": question.kind_a, "b": question.kind_b}
    if strategy == "machine" and system in question.machine:  # where `system` could judge
        return question.machine[system]
    if strategy in ("ground-truth", "machine") and "G" in kinds.values():
        return "a" if kinds["a"] == "G" else "b"
    return "a" if rng.random() < 0.5 else "b"


def _behaviour(strategy: str, rng: np.random.Generator) -> str:
    first = int(rng.integers(100, 1000))
    return json.dumps(
        {
            "bot": strategy,
            "plays": {"query": 1, "a": 1, "b": 1},
            "first_play_ms": first,
            "listened_ms": {"a": 2000, "b": 2000},
            "blur": 0,
            "focus": 0,
            "hidden": 0,
            "errors": [],
        }
    )


def _checked(response: requests.Response) -> requests.Response:
    if response.status_code >= 500:
        raise BotError(f"{response.url}: server error {response.status_code}")
    if response.status_code == 400:
        raise BotError(f"{response.url}: refused: {response.text[:200]}")
    return response


@dataclass
class _Form:
    action: str
    hidden: dict
    buttons: dict  # name → values of its submit buttons
    checkboxes: set


class _FormParser(HTMLParser):
    """The page's POST form: hidden fields, submit buttons, checkboxes."""

    def __init__(self):
        super().__init__()
        self.form: _Form | None = None
        self.inside = False

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and a.get("method", "").lower() == "post" and self.form is None:
            self.form, self.inside = _Form(a.get("action", ""), {}, {}, set()), True
        elif not self.inside:
            return
        elif tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.form.hidden[a["name"]] = a.get("value", "")
        elif tag == "input" and a.get("type") == "checkbox" and a.get("name"):
            self.form.checkboxes.add(a["name"])
        elif tag == "button" and a.get("type", "submit") == "submit" and a.get("name"):
            self.form.buttons.setdefault(a["name"], []).append(a.get("value", ""))

    def handle_endtag(self, tag):
        if tag == "form":
            self.inside = False


def _form(html: str) -> _Form | None:
    parser = _FormParser()
    parser.feed(html)
    return parser.form


class _CodeParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.code, self.inside = "", False

    def handle_starttag(self, tag, attrs):
        self.inside = ("id", "completion-code") in attrs

    def handle_data(self, data):
        if self.inside:
            self.code += data.strip()

    def handle_endtag(self, tag):
        self.inside = False

    @classmethod
    def find(cls, html: str) -> str:
        parser = cls()
        parser.feed(html)
        return parser.code
