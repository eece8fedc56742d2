"""The load and fault run (`bench/load.py`) at a small size: nothing lost, nothing doubled.

40 subjects answer 6 questions each (two blocks and the break) through a real gunicorn, as the
question page's script does or (a quarter) as a browser without script does, with double
posts, reloads, Back and re-post, subjects who leave and come back, and one SIGKILL of the
whole server mid-run. The bench makes its own database next to the test one: a SQLite file
here, a PostgreSQL database on the same server when DATABASE_URL points at PostgreSQL (CI).
Speed is printed, never asserted.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SUBJECTS = 40


def bench_database_url(tmp_path) -> str:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith("postgres"):
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        parsed = urlparse(url)
        return parsed._replace(path=f"/{parsed.path.lstrip('/') or 'test'}_load_{worker}").geturl()
    return f"sqlite:///{tmp_path / 'load.sqlite3'}"


@pytest.mark.slow
def test_no_answer_is_lost_or_doubled_under_load_and_a_server_crash(tmp_path):
    figures = tmp_path / "figures.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "load.py"),
        f"--subjects={SUBJECTS}",
        "--per-type=1",
        "--think-scale=0.02",
        "--abandon=0.05",
        "--plain=0.25",  # browsers without script: the form's POST and the redirect
        "--max-seconds=150",
        f"--database-url={bench_database_url(tmp_path)}",
        f"--json={figures}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "VAR_DIR")}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    print(run.stdout, run.stderr[-3000:])  # the figures, shown with -s or on failure
    assert figures.exists(), run.stderr[-3000:]
    result = json.loads(figures.read_text())
    assert result["lost"] == 0
    assert result["doubled"] == 0
    assert result["wrong position"] == 0
    assert result["different choice"] == 0
    assert result["completed subjects"] == SUBJECTS
    assert result["answers exported"] == SUBJECTS * 6
    assert result["server killed and restarted"] is True
    assert result["client-side problems"] == 0, result["problems"]
    assert "nan" not in result["answer→next p50 / p99 ms, browsers without script"]  # both ways
    assert run.returncode == 0
