"""Load and fault run: N subjects answer a whole study at once through gunicorn, with faults.

    python bench/load.py                    # 500 subjects × 120 questions, PostgreSQL
    python bench/load.py --subjects 40 --per-type 5 --think-scale 0.02   # a quick run

It makes its own database: the one named by --database-url, or LOAD_DATABASE_URL (default
postgres://postgres@127.0.0.1:5432/vmstudy_load; DATABASE_URL is not read). That database is
DROPPED and created anew at the start (a sqlite:/// URL's file is deleted), and a PostgreSQL
one is dropped again at the end unless --keep-database: never name a study's database. It
migrates, creates an open study over a synthetic collection (pairs without media files: the
bench never fetches media) and its subjects with `create_subject`, and starts
`gunicorn study_site.wsgi` with production settings (DJANGO_ENV=production, DEBUG off,
whitenoise) on a free loopback port. Every subject then acts
as a browser would: it opens its link, ticks consent and starts, and answers every question
after a think time drawn per answer, with its cookies and the page's `Origin`. Most
answer as the question page's script does (one POST that gets the next question as JSON,
shown in place); a share (`--plain`, default 10%) as a browser without JavaScript does (the
form's POST, then the page it redirects to). The requests carry `X-Forwarded-Proto: https`,
as behind the TLS proxy production runs behind (so the secure cookies and HSTS are those of
production).
Like a browser, each subject keeps its connections open between requests (keep-alive) and
opens a second one for a second request at once. The client runs on the same cores as the
server, so it is light: a small HTTP/1.1 client on asyncio streams, pages read by regex.

Faults (each on by default, `--no-<fault>` turns it off):
  double   ~5% of answers are posted twice at once (a double click, two tabs)
  refresh  ~5% of question pages are reloaded before answering
  back     ~3% of answers are followed by Back and a re-post of an earlier question's form,
           with a choice that may differ from the one given then
  abandon  ~2% of subjects close the browser mid-study and come back later with the same link
           (no cookies): the page must resume at their first unanswered question
  kill     once, when ~40% of the answers are in (or 40% of --max-seconds has passed), the
           gunicorn master and its workers are killed with SIGKILL (a crash) and a new server
           is started; clients retry as a browser would (re-submitting the same form)

What "acknowledged" means: the client posted choice c for position p, and a page it then
received shows the subject past p (a later question, the break before one, or the done page).
A lost acknowledgement is fine: when the server dies after committing but before answering,
the client re-posts the same form, the server sees p answered and moves on, and the stored
answer (made from the same form) is the truth. A client never posts a different choice for a
question it has not seen acknowledged, so acknowledged answers have exactly one expected choice.

At the end the export (`experiments.export.response_rows`, what `export_responses` writes) is
compared with every subject's acknowledged answers:
  lost             acknowledged, not in the export
  doubled          more than one exported answer for one subject and position
  wrong position   an exported answer for a position that subject never posted at its own
                   question page (e.g. a Back re-post stored at the current question)
  different choice exported choice ≠ the acknowledged one
Each must be 0; the run also fails when a subject could not finish, when a resumed or reloaded
page showed another question than expected, or when the server's progress went backwards.
Latency: answer POST sent → next question received (the JSON, or the page after the
redirect; both together, the plain forms' also apart, and those 30 s or more away from the
start and the restart), for answers that needed no retry; answers that had to wait out the
crash are counted apart, with their worst recovery time. Prints one table; `--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from urllib.parse import urlencode, urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/vmstudy_load"
DONE = 10**6  # the progress of a finished subject: past every position
SETUP_THREADS = 4
CALM_AFTER_S = 30.0  # the steady-state latency leaves out this long after the start and restart


# --- Configuration -------------------------------------------------------------------------


@dataclass
class Config:
    subjects: int = 500
    per_type: int = 20
    pairs: int = 0  # 0: enough for per_type
    think: tuple[float, float] = (0.5, 3.0)
    think_scale: float = 1.0
    plain: float = 0.1  # share of subjects whose browser runs no script
    workers: int = 0  # 0: gunicorn.conf.py's default
    threads: int = 0  # per worker; 0: gunicorn.conf.py's default
    database_url: str = DEFAULT_DATABASE_URL
    double: float = 0.05
    refresh: float = 0.05
    back: float = 0.03
    abandon: float = 0.02
    abandon_pause: float = 10.0  # seconds away (scaled by think_scale)
    kill: bool = True
    kill_at: float = 0.4  # share of all answers in when the server is killed
    restart_delay: float = 1.0
    max_seconds: float = 1800.0
    seed: int = 0
    json_path: str = ""
    keep_database: bool = False


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--subjects", type=int, default=500)
    p.add_argument("--per-type", type=int, default=20, help="questions per type and block")
    p.add_argument("--pairs", type=int, default=0, help="test pairs (default: enough)")
    p.add_argument("--think", type=float, nargs=2, default=(0.5, 3.0), metavar=("MIN", "MAX"))
    p.add_argument("--think-scale", type=float, default=1.0, help="multiplies think times")
    p.add_argument(
        "--plain", type=float, default=0.1, help="share of subjects without script (default 0.1)"
    )
    p.add_argument("--workers", type=int, default=0, help="gunicorn workers (default: cores)")
    p.add_argument("--threads", type=int, default=0, help="threads per worker (default 6)")
    p.add_argument("--database-url", default=os.environ.get("LOAD_DATABASE_URL", ""))
    for name, share in (("double", 0.05), ("refresh", 0.05), ("back", 0.03), ("abandon", 0.02)):
        p.add_argument(f"--{name}", type=float, default=share, help=f"share (default {share})")
        p.add_argument(f"--no-{name}", action="store_true")
    p.add_argument("--abandon-pause", type=float, default=10.0)
    p.add_argument("--no-kill", action="store_true", help="do not kill the server mid-run")
    p.add_argument("--kill-at", type=float, default=0.4)
    p.add_argument("--restart-delay", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=1800.0, help="bound on the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--keep-database", action="store_true")
    a = p.parse_args(argv)
    return Config(
        subjects=a.subjects,
        per_type=a.per_type,
        pairs=a.pairs,
        think=tuple(a.think),
        think_scale=a.think_scale,
        plain=a.plain,
        workers=a.workers,
        threads=a.threads,
        database_url=a.database_url or DEFAULT_DATABASE_URL,
        double=0.0 if a.no_double else a.double,
        refresh=0.0 if a.no_refresh else a.refresh,
        back=0.0 if a.no_back else a.back,
        abandon=0.0 if a.no_abandon else a.abandon,
        abandon_pause=a.abandon_pause,
        kill=not a.no_kill,
        kill_at=a.kill_at,
        restart_delay=a.restart_delay,
        max_seconds=a.max_seconds,
        seed=a.seed,
        json_path=a.json,
        keep_database=a.keep_database,
    )


# --- The database and the study ------------------------------------------------------------


def recreate_database(url: str) -> None:
    """Drop and create the bench's own database (a PostgreSQL database or a SQLite file)."""
    parsed = urlparse(url)
    if parsed.scheme.startswith("sqlite"):
        path = Path(parsed.path)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    import psycopg

    name = parsed.path.lstrip("/")
    if not re.fullmatch(r"\w+", name):
        raise SystemExit(f"refusing an unusual database name: {name!r}")
    admin_url = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme.startswith("sqlite"):
        return
    import psycopg

    admin_url = parsed._replace(path="/postgres").geturl()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parsed.path.lstrip("/")}" WITH (FORCE)')


def server_environment(config: Config, var_dir: Path) -> dict:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "study_site.settings",
        "DJANGO_ENV": "production",
        "DEBUG": "0",
        "DATABASE_URL": config.database_url,
        "DB_CONN_MAX_AGE": "600",
        "VAR_DIR": str(var_dir),
        "MEDIA_ROOT": str(var_dir / "media"),
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "LOG_LEVEL": "ERROR",
        "PYTHONUNBUFFERED": "1",
    }


def prepare_study(config: Config) -> tuple[str, list[str]]:
    """Migrate, collect static files, create the open study and its subjects; (slug, tokens)."""
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    call_command("collectstatic", verbosity=0, interactive=False)

    from experiments.models import (
        Collection,
        Direction,
        Pair,
        SearchResult,
        Split,
        Study,
        StudySystem,
        System,
    )
    from experiments.subjects import create_subject

    rng = random.Random(config.seed)
    n_pairs = config.pairs or max(100, 3 * config.per_type + 20)
    collection = Collection.objects.create(name="load")
    pairs = Pair.objects.bulk_create(
        Pair(
            collection=collection,
            key=f"item{i:04d}",
            split=Split.TEST,
            status=Pair.Status.READY,
            duration_s=30.0,
        )
        for i in range(n_pairs)
    )
    system = System.objects.create(
        collection=collection, name="random", status=System.Status.READY, progress=1.0
    )
    SearchResult.objects.bulk_create(
        (
            SearchResult(system=system, direction=direction, query=query, rank=rank, result=result)
            for query in pairs
            for direction in Direction.values
            for rank, result in enumerate(rng.sample(pairs, 10), start=1)
        ),
        batch_size=2000,
    )
    study = Study.objects.create(
        name="Load",
        slug="load",
        collection=collection,
        per_type=config.per_type,
        seed=config.seed,
        status=Study.Status.OPEN,
        require_consent=True,
        consent_text="A load test.",
        completion_code="LOAD-DONE",
    )
    StudySystem.objects.create(study=study, system=system, label="S")
    from django.db import connection, connections

    def create(count: int) -> list[str]:
        try:
            return [create_subject(study).token for _ in range(count)]
        finally:
            connection.close()  # this thread's own connection

    # A subject's plan is read and computed outside the study's lock and written under it:
    # a few threads overlap the two (500 subjects one by one took minutes).
    threads = min(SETUP_THREADS, config.subjects)
    shares = [config.subjects // threads + (i < config.subjects % threads) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        tokens = [token for chunk in pool.map(create, shares) for token in chunk]
    connections.close_all()
    return study.slug, tokens


# --- The server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`gunicorn study_site.wsgi` in its own process group, so that a crash takes all of it."""

    def __init__(self, env: dict, port: int, workers: int, threads: int, log: Path):
        self.env, self.port, self.log = env, port, log
        self.workers, self.threads = workers, threads
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> None:
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "study_site.wsgi",
            "-c",
            str(ROOT / "study_site" / "gunicorn.conf.py"),
            "--bind",
            f"127.0.0.1:{self.port}",
        ]
        if self.workers:
            command += ["--workers", str(self.workers)]
        if self.threads:
            command += ["--threads", str(self.threads)]
            command += ["--worker-class", "gthread" if self.threads > 1 else "sync"]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("gunicorn exited:\n" + self.log.read_text()[-3000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn did not start listening in time")

    def crash(self) -> None:
        """SIGKILL the master and every worker: what an OOM kill or a host crash does."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        time.sleep(0.2)  # the kernel reaps the workers' sockets

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


# --- Pages ---------------------------------------------------------------------------------


# The client shares the machine's cores with the server: pages are read with two regular
# expressions (C code), not html.parser (4x the CPU), which is enough for the site's own forms.
TAG = re.compile(r"<(/?)(form|input|button|title)\b([^>]*)>", re.IGNORECASE)
ATTRIBUTE = re.compile(r"""([^\s=/>]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?""")


def read_forms(html: str) -> tuple[list[dict], str]:
    """The POST forms of a page (fields, checkboxes, submit buttons) and its title."""
    forms, form, title = [], None, ""
    for match in TAG.finditer(html):
        closing, tag = match[1], match[2].lower()
        if tag == "title":
            if not closing:
                title = html[match.end() : html.find("<", match.end())]
            continue
        if tag == "form":
            form = None
            if not closing:
                a = attributes(match[3])
                if a.get("method", "").lower() == "post":
                    form = {
                        "action": a.get("action", ""),
                        "direction": a.get("data-direction", ""),
                        "fields": {},
                        "checks": [],
                        "submits": [],
                    }
                    forms.append(form)
            continue
        if form is None or closing:
            continue
        a = attributes(match[3])
        kind = a.get("type", "submit" if tag == "button" else "text").lower()
        name = a.get("name")
        if kind == "submit":
            form["submits"].append((name, a.get("value", "")))
        elif kind == "checkbox" and name:
            form["checks"].append((name, a.get("value") or "on"))
        elif name:
            form["fields"][name] = a.get("value", "")
    return forms, unescape(title)


def attributes(text: str) -> dict:
    return {
        m[1].lower(): unescape(
            m[2] if m[2] is not None else m[3] if m[3] is not None else m[4] or ""
        )
        for m in ATTRIBUTE.finditer(text)
    }


@dataclass
class Page:
    status: int
    html: str
    forms: list[dict]
    title: str

    @classmethod
    def parse(cls, response: Response) -> Page:
        forms, title = read_forms(response.text)
        return cls(response.status_code, response.text, forms, title.strip())

    @property
    def form(self) -> dict | None:
        return self.forms[0] if self.forms else None

    @property
    def is_question(self) -> bool:
        return bool(self.form) and any(name == "choice" for name, _ in self.form["submits"])

    @property
    def is_done(self) -> bool:
        return self.status == 200 and not self.forms and "completion-code" in self.html

    @property
    def progress(self) -> int:
        """The position the subject is at: its first unanswered question (DONE when done)."""
        if self.is_done:
            return DONE
        if self.form and self.form["fields"].get("position", "").isdigit():
            return int(self.form["fields"]["position"])
        return 0  # before the first question (welcome) or an unknown page


# --- Figures -------------------------------------------------------------------------------


@dataclass
class Stats:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    # answers that needed no retry: (time.monotonic() when sent, seconds, sent by the script)
    latencies: list[tuple[float, float, bool]] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)  # answers that needed retries
    answers_in: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    faults: Counter = field(default_factory=Counter)
    loads: list[float] = field(default_factory=list)  # 1-minute load average, sampled
    client_cpu_s: float = 0.0  # this process's CPU time while driving the subjects
    started_at: float = 0.0  # time.monotonic() when the subjects set off
    server_cpu_s: dict = field(default_factory=dict)  # gunicorn's and PostgreSQL's

    def problem(self, kind: str, detail: str) -> None:
        self.problems[kind] += 1
        self.examples.setdefault(kind, detail)


@dataclass
class Ledger:
    """What one subject's browser posted and saw acknowledged."""

    token: str
    posted: dict[int, str] = field(default_factory=dict)  # first choice posted per position
    acked: dict[int, str] = field(default_factory=dict)
    completed: bool = False


class Gone(Exception):
    """The server stayed unreachable for longer than a participant would wait."""


# --- A participant's browser ----------------------------------------------------------------


class TransportError(Exception):
    """No response: the connection was refused or reset, or the response was cut short."""


@dataclass
class Response:
    status_code: int
    headers: list[tuple[str, str]]  # names in lower case, in order
    text: str

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    @property
    def is_redirect(self) -> bool:
        return self.status_code in (301, 302, 303, 307, 308) and self.header("location") is not None


class Connections:
    """A browser's keep-alive connections to the server: an idle one is reused, another one
    opens while it is busy (a double click). Written by hand because the client shares the
    machine's cores with the server: httpx took ~7 ms of CPU a request here, this ~1 ms."""

    ERRORS = (TimeoutError, OSError, EOFError, ValueError, asyncio.LimitOverrunError)

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, path: str, headers: dict, body: bytes | None):
        for attempt in (1, 2):
            streams = self.idle.pop() if self.idle and attempt == 1 else None
            reused = streams is not None
            try:
                if streams is None:
                    streams = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), 60.0
                    )
                request = self._request(method, path, headers, body)
                response, keep = await asyncio.wait_for(_exchange(*streams, request), 60.0)
            except self.ERRORS as error:
                if streams is not None:
                    streams[1].close()
                if reused and _nothing_received(error):
                    continue  # the server had closed the idle connection: send on a new one
                raise TransportError(type(error).__name__) from error
            if keep:
                self.idle.append(streams)
            else:
                streams[1].close()
            return response
        raise AssertionError("unreachable")

    def _request(self, method, path, headers, body) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines += [
                "Content-Type: application/x-www-form-urlencoded",
                f"Content-Length: {len(body)}",
            ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")

    def close(self):
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def _nothing_received(error: Exception) -> bool:
    if isinstance(error, asyncio.IncompleteReadError):
        return not error.partial
    return isinstance(error, (ConnectionResetError, BrokenPipeError))


async def _exchange(reader, writer, request: bytes) -> tuple[Response, bool]:
    """Send one request and read its response; (response, whether the connection stays open)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    fields = [line.partition(":") for line in head[1:] if line]
    response = Response(status, [(k.strip().lower(), v.strip()) for k, _, v in fields], "")
    keep = "close" not in (response.header("connection") or "").lower()
    length = response.header("content-length")
    if "chunked" in (response.header("transfer-encoding") or "").lower():
        content = await _read_chunked(reader)
    elif length is not None:
        content = await reader.readexactly(int(length))
    else:
        content, keep = await reader.read(), False
    response.text = content.decode("utf-8", "replace")
    return response, keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    await reader.readuntil(b"\r\n")  # no trailers are sent
    return b"".join(parts)


class Browser:
    """One subject's browser: its own cookies, redirects followed by hand, retries on failure."""

    RETRY_FOR_S = 180.0

    def __init__(self, base: str, stats: Stats):
        self.base, self.stats = base, stats
        self.cookies: dict[str, str] = {}
        address = urlparse(base)
        self.connections = Connections(address.hostname, address.port)
        self.origin = "https://" + address.netloc

    async def close(self):
        self.connections.close()

    def _headers(self, post: bool = False, script: bool = False) -> dict:
        headers = {"X-Forwarded-Proto": "https", "User-Agent": "vmstudy-load/1"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if post:
            headers["Origin"] = self.origin
        if script:
            headers["Accept"] = "application/json"
        return headers

    async def _send(self, method: str, path: str, data=None, script=False) -> Response:
        """One request; connection failures raise TransportError."""
        self.stats.requests += 1
        body = None if data is None else urlencode(data).encode()
        try:
            response = await self.connections.request(
                method, path, self._headers(method == "POST", script), body
            )
        except TransportError as error:
            self.stats.statuses[str(error)] += 1
            raise
        self.stats.statuses[response.status_code] += 1
        # Secure cookies over this plain loopback connection: kept by hand, as a browser
        # behind the TLS proxy would keep them.
        for key, header in response.headers:
            if key == "set-cookie":
                name, _, rest = header.partition("=")
                self.cookies[name.strip()] = rest.split(";", 1)[0]
        return response

    async def _retrying(self, method: str, path: str, data=None, script=False):
        """Send until the server answers with something other than a 5xx; (response, retried)."""
        delay, deadline, retried = 0.2, time.monotonic() + self.RETRY_FOR_S, False
        while True:
            try:
                response = await self._send(method, path, data, script)
                if response.status_code < 500:
                    return response, retried
            except TransportError:
                pass
            if time.monotonic() > deadline:
                raise Gone(f"{method} {path}")
            retried = True
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 3.0)

    async def get(self, path: str) -> tuple[Page, bool]:
        response, retried = await self._retrying("GET", path)
        while response.is_redirect:
            more = False
            response, more = await self._retrying("GET", local(response.header("location")))
            retried = retried or more
        return Page.parse(response), retried

    async def post(self, path: str, data: dict) -> tuple[Page, bool]:
        """POST the form; follow its redirect; the page the browser then shows."""
        response, retried = await self._retrying("POST", path, data)
        if not response.is_redirect:
            return Page.parse(response), retried
        page, more = await self.get(local(response.header("location")))
        return page, retried or more

    async def post_in_place(self, path: str, data: dict, form: dict) -> tuple[Page, bool]:
        """POST an answer as the question page's script does: the next question of the block
        comes back as JSON and is shown in place; any other step is loaded as a page."""
        response, retried = await self._retrying("POST", path, data, script=True)
        if not (response.header("content-type") or "").startswith("application/json"):
            return Page.parse(response), retried
        step = json.loads(response.text)
        if step["step"] != "question" or step["direction"] != form["direction"]:
            page, more = await self.get(local(step["location"]))
            return page, retried or more
        fields = form["fields"] | {"position": str(step["position"])}
        return Page(response.status_code, "", [form | {"fields": fields}], ""), retried


def local(location: str) -> str:
    """A redirect's target as a path on this server."""
    target = urlparse(location)
    return target.path + (f"?{target.query}" if target.query else "")


# --- A subject's session ------------------------------------------------------------------


class Subject:
    def __init__(self, token, base, config: Config, stats: Stats, rng: random.Random, abandons):
        self.ledger = Ledger(token)
        self.path = f"/s/{token}/"
        self.base, self.config, self.stats, self.rng = base, config, stats, rng
        self.abandons = abandons
        self.scripted = rng.random() >= config.plain  # the page's script sends the answers
        self.old_forms: list[dict] = []  # earlier question forms, for Back

    async def think(self, low: float | None = None, high: float | None = None):
        low, high = low or self.config.think[0], high or self.config.think[1]
        await asyncio.sleep(self.rng.uniform(low, high) * self.config.think_scale)

    async def run(self):
        browser = Browser(self.base, self.stats)
        try:
            page, _ = await browser.get(self.path)
            questions = 6 * self.config.per_type
            abandon_after = self.rng.randint(1, questions - 1) if self.abandons else None
            answered_here = 0
            while not page.is_done:
                if page.status != 200 or not page.form:
                    self.stats.problem("unexpected page", f"{page.status} {page.title}")
                    return
                if not page.is_question:
                    await self.think(0.2, 1.0)
                    page = await self.submit_step(browser, page)
                    continue
                if abandon_after is not None and answered_here >= abandon_after:
                    page, browser = await self.come_back(browser)
                    abandon_after = None
                    continue
                page = await self.answer(browser, page)
                answered_here += 1
            self.ledger.completed = True
        except Gone as error:
            self.stats.problem("gave up (server unreachable)", str(error))
        finally:
            await browser.close()

    async def submit_step(self, browser: Browser, page: Page) -> Page:
        """Welcome, break or any other non-question step: tick boxes, press its button."""
        form = page.form
        data = dict(form["fields"]) | dict(form["checks"])
        name, value = next(iter(form["submits"]), (None, ""))
        if name:
            data[name] = value
        before = page.progress
        page, _ = await browser.post(form["action"] or self.path, data)
        if page.progress < before:
            self.stats.problem("progress went backwards", f"{self.ledger.token}: {before}")
        return page

    async def answer(self, browser: Browser, page: Page) -> Page:
        position = page.progress
        if self.rng.random() < self.config.refresh:
            self.stats.faults["refresh"] += 1
            again, _ = await browser.get(self.path)
            if again.progress != position:
                self.stats.problem(
                    "reload showed another question", f"{position} → {again.progress}"
                )
            page = again
        await self.think()
        expected = self.ledger.posted.setdefault(position, self.rng.choice("ab"))
        data = dict(page.form["fields"]) | {"choice": expected}

        def send():
            if self.scripted:
                return browser.post_in_place(self.path, data, page.form)
            return browser.post(self.path, data)

        start, sent_at = time.perf_counter(), time.monotonic()
        if self.rng.random() < self.config.double:
            self.stats.faults["double post"] += 1
            results = await asyncio.gather(send(), send())
            next_page = max((page for page, _ in results), key=lambda p: p.progress)
            retried = any(retried for _, retried in results)
        else:
            next_page, retried = await send()
        elapsed = time.perf_counter() - start
        if next_page.status >= 400:
            self.stats.problem(f"answer refused ({next_page.status})", next_page.html[:200])
            next_page, _ = await browser.get(self.path)  # reload: a fresh form and token
            return next_page
        if next_page.progress > position:
            self.ledger.acked[position] = expected
            self.stats.answers_in += 1
            if retried:
                self.stats.recoveries.append(elapsed)
            else:
                self.stats.latencies.append((sent_at, elapsed, self.scripted))
        elif next_page.progress < position:
            self.stats.problem("progress went backwards", f"{position} → {next_page.progress}")
        else:  # the same question again: the browser will post the same answer once more
            self.stats.problem("answer not taken", f"{self.ledger.token[:8]}… {position}")
        self.old_forms.append(data)
        if self.rng.random() < self.config.back and len(self.old_forms) > 1:
            next_page = await self.back_and_repost(browser, next_page)
        return next_page

    async def back_and_repost(self, browser: Browser, current: Page) -> Page:
        """Back to an earlier question and post its form again, maybe with the other choice."""
        self.stats.faults["back + re-post"] += 1
        stale = dict(self.rng.choice(self.old_forms[:-1]))
        stale["choice"] = self.rng.choice("ab")
        page, _ = await browser.post(self.path, stale)
        if page.progress != current.progress:
            self.stats.problem(
                "a stale re-post moved the subject", f"{current.progress} → {page.progress}"
            )
        return page

    async def come_back(self, browser: Browser) -> tuple[Page, Browser]:
        """Close the browser (cookies gone), stay away a while, open the link again."""
        self.stats.faults["abandon + return"] += 1
        await browser.close()
        # A new browser has no history to go Back to.
        self.old_forms.clear()
        await asyncio.sleep(self.config.abandon_pause * self.config.think_scale)
        browser = Browser(self.base, self.stats)
        page, _ = await browser.get(self.path)
        expected = max(self.ledger.acked, default=0) + 1
        if page.progress != expected:
            self.stats.problem("resumed elsewhere", f"expected {expected}, got {page.progress}")
        return page, browser


# --- The run -------------------------------------------------------------------------------


async def crash_once(server: Server, stats: Stats, total_answers: int, config: Config, log):
    """Kill the server once `kill_at` of the answers are in (or that share of the time bound
    has passed, so that a run cut short by its bound still has its crash)."""
    deadline = time.monotonic() + config.kill_at * config.max_seconds
    while stats.answers_in < config.kill_at * total_answers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    at = stats.answers_in
    await asyncio.to_thread(server.crash)
    log["killed_at_answers"] = at
    started = time.monotonic()
    await asyncio.sleep(config.restart_delay)
    await asyncio.to_thread(server.start)
    log["down_s"] = time.monotonic() - started
    log["restarted_at"] = time.monotonic()


async def sample_load(stats: Stats, every_s: float = 5.0):
    """The machine's load during the run (it is shared: the figures depend on it)."""
    while True:
        stats.loads.append(os.getloadavg()[0])
        await asyncio.sleep(every_s)


class CpuMeter:
    """CPU seconds the server's processes (gunicorn, PostgreSQL) spend during the run, read
    from /proc (Linux) once a second: each process's last reading less its first; processes
    started during the run (a restarted server, new database connections) count from zero.
    A process's last second before it is killed goes uncounted."""

    KINDS = {"gunicorn": b"gunicorn", "postgres": b"postgres"}

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.first: dict[tuple[str, int], float] = self.read()
        self.last = dict(self.first)

    def read(self) -> dict[tuple[str, int], float]:
        found = {}
        for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
            if not name.isdigit():
                continue
            try:
                command = Path(f"/proc/{name}/cmdline").read_bytes()
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            for kind, marker in self.KINDS.items():
                if marker in command[:200]:
                    found[kind, int(name)] = (int(fields[11]) + int(fields[12])) / self.tick
        return found

    async def run(self, every_s: float = 1.0):
        while True:
            await asyncio.sleep(every_s)
            self.last.update(await asyncio.to_thread(self.read))

    def seconds(self, kind: str) -> float:
        return sum(t - self.first.get(key, 0.0) for key, t in self.last.items() if key[0] == kind)


async def drive(config: Config, base: str, tokens: list[str], server: Server, stats: Stats):
    rng = random.Random(config.seed + 1)
    n_abandon = max(1, round(config.abandon * len(tokens))) if config.abandon else 0
    abandoners = set(rng.sample(range(len(tokens)), min(n_abandon, len(tokens))))
    subjects = [
        Subject(t, base, config, stats, random.Random(rng.random()), i in abandoners)
        for i, t in enumerate(tokens)
    ]
    crash_log: dict = {}
    questions = 6 * config.per_type
    crasher = (
        asyncio.create_task(crash_once(server, stats, len(tokens) * questions, config, crash_log))
        if config.kill
        else None
    )
    sampler = asyncio.create_task(sample_load(stats))
    meter = CpuMeter()
    metering = asyncio.create_task(meter.run())
    stats.started_at = time.monotonic()
    tasks = [asyncio.create_task(s.run()) for s in subjects]
    _, pending = await asyncio.wait(tasks, timeout=config.max_seconds)
    for task in pending:
        task.cancel()
    if pending:
        stats.problem("stopped at the time bound", f"{len(pending)} subjects")
        await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            stats.problem("client crashed", f"{type(error).__name__}: {error}")
    sampler.cancel()
    metering.cancel()
    meter.last.update(meter.read())
    stats.server_cpu_s = {kind: meter.seconds(kind) for kind in CpuMeter.KINDS}
    if crasher is not None:
        if not crasher.done():
            crasher.cancel()
            stats.problem("server never killed", "the run ended before --kill-at")
        elif crasher.exception() is not None:
            stats.problem("restart failed", str(crasher.exception()))
    return [s.ledger for s in subjects], crash_log


def compare(slug: str, ledgers: list[Ledger]) -> dict:
    """The export against what every client saw acknowledged."""
    from experiments.export import response_rows
    from experiments.models import Study

    stored: dict[str, dict[int, list[str]]] = {}
    completed_in_db = set()
    for row in response_rows(Study.objects.get(slug=slug)):
        choice = "a" if row["chosen_item"] == row["option_a"] else "b"
        stored.setdefault(row["subject"], {}).setdefault(row["position"], []).append(choice)
        if row["subject_completed"]:
            completed_in_db.add(row["subject"])
    figures = Counter()
    examples = {}
    for ledger in ledgers:
        rows = stored.get(ledger.token, {})
        checks = {
            "lost": [p for p in ledger.acked if p not in rows],
            "doubled": [p for p, c in rows.items() if len(c) > 1],
            "wrong position": [p for p in rows if p not in ledger.posted],
            "different choice": [
                p for p, c in ledger.acked.items() if p in rows and rows[p][0] != c
            ],
            "stored, ack lost": [p for p in rows if p in ledger.posted and p not in ledger.acked],
            "completed, not in db": [1]
            if ledger.completed and ledger.token not in completed_in_db
            else [],
        }
        for name, items in checks.items():
            figures[name] += len(items)
            if items:
                examples.setdefault(name, f"{ledger.token[:8]}… positions {items[:5]}")
        figures["answers acknowledged"] += len(ledger.acked)
        figures["answers exported"] += sum(len(c) for c in rows.values())
    return {"figures": figures, "examples": examples}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summarise(config: Config, stats: Stats, ledgers, result, crash_log, elapsed, loads) -> dict:
    f = result["figures"]
    ms = [1000 * seconds for _, seconds, _ in stats.latencies]
    plain_ms = [1000 * seconds for _, seconds, scripted in stats.latencies if not scripted]
    # Away from the two bursts the run has by design: every subject opening its link at once,
    # and every client retrying after the restart.
    restarted_at = crash_log.get("restarted_at", -1e9)
    calm = [
        1000 * seconds
        for at, seconds, _ in stats.latencies
        if at - stats.started_at >= CALM_AFTER_S and not 0 <= at - restarted_at < CALM_AFTER_S
    ]
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(stats.statuses.items(), key=str))
    return {
        "subjects": config.subjects,
        "questions per subject": 6 * config.per_type,
        "completed subjects": sum(1 for ledger in ledgers if ledger.completed),
        "answers acknowledged": f["answers acknowledged"],
        "answers exported": f["answers exported"],
        "lost": f["lost"],
        "doubled": f["doubled"],
        "wrong position": f["wrong position"],
        "different choice": f["different choice"],
        "stored, ack lost (then confirmed)": f["stored, ack lost"],
        "completed but not in db": f["completed, not in db"],
        "client-side problems": sum(stats.problems.values()),
        "requests": stats.requests,
        "responses by status": statuses,
        "faults injected": ", ".join(f"{k} {v}" for k, v in sorted(stats.faults.items()))
        + (
            f", server SIGKILL at answer {crash_log.get('killed_at_answers')}"
            f" (down {crash_log.get('down_s', float('nan')):.1f} s)"
            if crash_log
            else ""
        ),
        "server killed and restarted": bool(crash_log.get("down_s")),
        "answer→next p50 ms": round(percentile(ms, 50), 1),
        "answer→next p95 ms": round(percentile(ms, 95), 1),
        "answer→next p99 ms": round(percentile(ms, 99), 1),
        "answer→next max ms": round(max(ms, default=float("nan")), 1),
        f"answer→next p50 / p95 / p99 ms, {CALM_AFTER_S:.0f} s or more after the start and "
        "the restart": " / ".join(f"{percentile(calm, q):.1f}" for q in (50, 95, 99)),
        "answer→next p50 / p99 ms, browsers without script": (
            f"{percentile(plain_ms, 50):.1f} / {percentile(plain_ms, 99):.1f}"
        ),
        "answers that waited out the crash": len(stats.recoveries),
        "their worst wait s": round(max(stats.recoveries, default=0.0), 2),
        "answers/s (mean)": round(f["answers acknowledged"] / elapsed, 1),
        "run time s": round(elapsed, 1),
        "load client CPU ms per request (shares the cores)": round(
            1000 * stats.client_cpu_s / max(stats.requests, 1), 2
        ),
        "CPU ms per answer: gunicorn / PostgreSQL / load client": " / ".join(
            f"{1000 * seconds / max(f['answers acknowledged'], 1):.2f}"
            for seconds in (*stats.server_cpu_s.values(), stats.client_cpu_s)
        ),
        "gunicorn workers × threads": f"{config.workers or os.cpu_count()} × "
        + str(config.threads or os.environ.get("WEB_THREADS", 6)),
        "load average 1 min (before / mean during / max / after)": (
            f"{loads[0]:.2f} / {sum(stats.loads) / max(len(stats.loads), 1):.2f} / "
            f"{max(stats.loads, default=0):.2f} / {loads[1]:.2f}"
        ),
        "cpu cores": os.cpu_count(),
        "problems": dict(stats.problems),
        "examples": {**stats.examples, **result["examples"]},
    }


def failed(summary: dict) -> bool:
    integrity = ("lost", "doubled", "wrong position", "different choice", "completed but not in db")
    return (
        any(summary[k] for k in integrity)
        or summary["client-side problems"] > 0
        or summary["completed subjects"] < summary["subjects"]
    )


def print_table(summary: dict) -> None:
    from tabulate import tabulate

    rows = [(k, v) for k, v in summary.items() if k not in ("problems", "examples")]
    rows += [(f"problem: {k}", v) for k, v in summary["problems"].items()]
    rows += [(f"example: {k}", v) for k, v in summary["examples"].items()]
    print(tabulate(rows, headers=["figure", "value"], tablefmt="github"))


def main(argv=None) -> int:
    config = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    var_dir = Path(tempfile.mkdtemp(prefix="vmstudy-load-"))
    env = server_environment(config, var_dir)
    os.environ.update(env)
    server = None
    try:
        recreate_database(config.database_url)
        t = time.monotonic()
        slug, tokens = prepare_study(config)
        print(
            f"study ready: {len(tokens)} subjects in {time.monotonic() - t:.0f} s; starting gunicorn",
            file=sys.stderr,
        )
        port = free_port()
        server = Server(env, port, config.workers, config.threads, var_dir / "gunicorn.log")
        server.start()
        stats = Stats()
        load_before = os.getloadavg()[0]
        started, cpu_started = time.monotonic(), time.process_time()
        ledgers, crash_log = asyncio.run(
            drive(config, f"http://127.0.0.1:{port}", tokens, server, stats)
        )
        elapsed = time.monotonic() - started
        stats.client_cpu_s = time.process_time() - cpu_started
        load_after = os.getloadavg()[0]
        server.stop()
        result = compare(slug, ledgers)
        summary = summarise(
            config, stats, ledgers, result, crash_log, elapsed, (load_before, load_after)
        )
        print_table(summary)
        if config.json_path:
            Path(config.json_path).write_text(json.dumps(summary, indent=1, default=str))
        return 1 if failed(summary) else 0
    finally:
        if server is not None:
            server.stop()
        from django.db import connections

        connections.close_all()
        if not config.keep_database:
            drop_database(config.database_url)
        shutil.rmtree(var_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
