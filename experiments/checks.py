"""Checks for crowd-sourced studies: the headphone check, catch scores, typed end codes.

The headphone check is Woods et al.'s (2017, "Headphone screening to facilitate web-based
auditory experiments"): each trial plays three 200 Hz tones and asks which is the quietest.
One is 6 dB quieter (the answer); one of the two louder ones is played with its stereo channels
in anti-phase. Over headphones that changes nothing; over loudspeakers the two channels
partly cancel in the air, so the anti-phase tone sounds quietest and the listener answers
wrongly. The trials are drawn on the server and kept in `Subject.meta`, and each tone is
served behind its trial and slot number, so the page does not give the answer away.
"""

import io

import numpy as np
from django.db.models import Count, Q
from scipy.io import wavfile

from experiments.models import Study, Subject

SOUND_TRIALS = 6
# Where MTurk's ExternalQuestion says (`turkSubmitTo`) an assignment is submitted; the only
# origins a subject's end page posts to, so a crafted link cannot send the form elsewhere.
MTURK_SUBMIT_ORIGINS = ("https://www.mturk.com", "https://workersandbox.mturk.com")
MTURK_PREVIEW = "ASSIGNMENT_ID_NOT_AVAILABLE"  # MTurk shows the page before the HIT is accepted
SOUND_PASS = 5  # correct trials needed (Woods et al.: 5 of 6)
TONE_HZ, TONE_S, RAMP_S, RATE = 200.0, 1.0, 0.1, 22050
STANDARD, QUIET, ANTIPHASE = "standard", "quiet", "antiphase"
QUIET_DB = -6.0
BASE_LEVEL = 0.25  # peak amplitude of the standard tone (well below clipping)


def new_sound_trials(rng: np.random.Generator | None = None) -> list[list[str]]:
    """SOUND_TRIALS orders of the three tones, each a permutation of the three kinds."""
    rng = rng or np.random.default_rng()
    kinds = np.array([STANDARD, QUIET, ANTIPHASE])
    return [kinds[rng.permutation(3)].tolist() for _ in range(SOUND_TRIALS)]


def score_sound_check(trials: list[list[str]], answers: list[int | None]) -> dict:
    """The check's result: the answers (1-based slots), how many were right, and passed."""
    correct = sum(
        answer is not None and trial[answer - 1] == QUIET
        for trial, answer in zip(trials, answers, strict=True)
    )
    return {
        "trials": trials,
        "answers": answers,
        "correct": correct,
        "passed": correct >= SOUND_PASS,
    }


def tone_wav(kind: str) -> bytes:
    """One tone of the check as a small 16-bit stereo WAV file."""
    t = np.arange(int(TONE_S * RATE)) / RATE
    ramp = np.clip(np.minimum(t, TONE_S - t) / RAMP_S, 0.0, 1.0)  # no clicks at the ends
    level = BASE_LEVEL * (10 ** (QUIET_DB / 20) if kind == QUIET else 1.0)
    mono = level * ramp * np.sin(2 * np.pi * TONE_HZ * t)
    right = -mono if kind == ANTIPHASE else mono
    samples = np.stack([mono, right], axis=1)
    buffer = io.BytesIO()
    wavfile.write(buffer, RATE, (samples * 32767).astype(np.int16))
    return buffer.getvalue()


def catch_score(subject: Subject) -> float | None:
    """Share of the subject's answered catch questions that chose the ground truth."""
    counts = subject.responses.filter(question__is_catch=True).aggregate(
        answered=Count("id"), passed=Count("id", filter=Q(chosen_kind="G"))
    )
    return counts["passed"] / counts["answered"] if counts["answered"] else None


def final_outcome(study: Study, score: float | None) -> str:
    """A finished subject's outcome: failed_attention below the study's threshold."""
    threshold = study.catch_pass_threshold
    if threshold is not None and score is not None and score < threshold:
        return Subject.Outcome.FAILED_ATTENTION
    return Subject.Outcome.COMPLETED


def end_code(subject: Subject) -> str:
    """The code the subject takes back to the recruiting platform for their outcome."""
    study = subject.study
    codes = {
        Subject.Outcome.FAILED_ATTENTION: study.failed_attention_code or study.completion_code,
        Subject.Outcome.FAILED_SOUND: study.failed_sound_code,
        Subject.Outcome.NO_CONSENT: study.no_consent_code,
    }
    return codes.get(subject.outcome, study.completion_code)


def end_redirect(subject: Subject) -> str:
    """Where the end page sends the subject: the study's redirect URL with `{code}` filled
    in; a URL without the placeholder is the completion URL, used for that code only."""
    url, code = subject.study.redirect_url, end_code(subject)
    if not url:
        return ""
    if "{code}" in url:
        return url.replace("{code}", code) if code else ""
    finished = subject.outcome in (Subject.Outcome.COMPLETED, Subject.Outcome.ACTIVE)
    return url if finished or (code and code == subject.study.completion_code) else ""


def mturk_submit(subject: Subject) -> dict | None:
    """The form that submits the subject's MTurk assignment (ExternalQuestion) with its end
    code, for a subject who came from a HIT: {"action", "assignment_id", "code"}; else None."""
    entry = subject.meta.get("entry", {})
    assignment, submit_to = entry.get("assignmentId"), entry.get("turkSubmitTo", "")
    if not assignment or assignment == MTURK_PREVIEW:
        return None
    if submit_to.rstrip("/") not in MTURK_SUBMIT_ORIGINS:
        return None
    action = submit_to.rstrip("/") + "/mturk/externalSubmit"
    return {"action": action, "assignment_id": assignment, "code": end_code(subject)}
