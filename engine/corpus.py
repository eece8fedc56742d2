"""A synthetic demo corpus: short "music videos" whose music and picture share a style.

Each clip draws style parameters (tempo, key, mode, timbre, drum density, loudness). The
music is synthesised from them (a chord loop in the key and mode over a tonic bass,
harmonics set by the timbre, kick and hi-hat by the drum density, RMS level by the
loudness); the picture is an audio-reactive visual driven by the same parameters and by the
audio's envelope (`picture_style`). Only one link is linear, and coarse (stripes from
timbre); the others are V-shaped (disc size in loudness) or interactions (brightness from
tempo times timbre, hue from drums times loudness), so a small non-linear model trained on a
few hundred pairs matches
music to picture far better than a linear map (CCA, PLS) of the same features, while each
music parameter stays linearly readable from the music features. The files are real MP4s
(H.264 + AAC) written with PyAV, so every part of the engine runs on them as on the user's
own music videos.
"""

from __future__ import annotations

import csv
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from engine.processes import process_pool

AUDIO_SR = 12_000  # the rate the music features analyse; keeps synthesis and AAC cheap
FPS = 10
WIDTH, HEIGHT = 160, 120
KEYS = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
MAJOR, MINOR = [0, 4, 7], [0, 3, 7]
# I-IV-V-I (i-iv-v-i in minor): both modes share the loop and the tonic bass, so the third of
# each chord is what tells the mode, in every key (a relative minor is not its major's twin).
PROGRESSION = [0, 5, 7, 0]
# Feature settings for a few hundred pairs, shared by every system compared on the corpus:
# the featurizers' default 1024 whitened frame dimensions are mostly noise at this size.
DEMO_FEATURES = {"frame_dims": 64, "video_dims": 128}
# VM-NET for a few hundred pairs on a CPU (the paper's TrainConfig defaults suit 10^5 pairs):
# narrow layers, more dropout, weight decay, one full batch, few hard negatives.
DEMO_VMNET_CONFIG = DEMO_FEATURES | {
    "video_layers": (256, 128),
    "music_layers": (256, 256, 128),
    "keep_prob": 0.7,
    "lr": 1e-3,
    "weight_decay": 0.05,
    "batch_size": 300,
    "top_k": 30,
    "max_epochs": 150,
    "patience": 40,
    "lambdas": (1.0, 1.0, 0.2, 0.2),  # equal weights, as the README's demo figures were measured
}
ADJECTIVES = ["Neon", "Velvet", "Broken", "Golden", "Silent", "Electric", "Paper", "Midnight"]
NOUNS = ["Rivers", "Engines", "Gardens", "Mirrors", "Signals", "Horizons", "Echoes", "Streets"]


def style(rng: np.random.Generator) -> dict:
    return {
        "tempo": float(rng.uniform(70, 170)),
        "key": int(rng.integers(12)),
        "mode": str(rng.choice(["major", "minor"])),
        "timbre": float(rng.uniform(0, 1)),  # 0 = pure sine, 1 = bright and buzzy
        "drums": float(rng.uniform(0, 1)),  # density of percussion
        "loudness": float(rng.uniform(0.25, 0.9)),
    }


def genre(s: dict) -> str:
    if s["drums"] < 0.3:
        return "ambient" if s["tempo"] < 120 else "minimal"
    if s["timbre"] > 0.6:
        return "rock" if s["tempo"] < 130 else "techno"
    return ("ballad" if s["mode"] == "minor" else "pop") if s["tempo"] < 120 else "dance"


def title(s: dict, rng: np.random.Generator) -> str:
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} in {KEYS[s['key']]} {s['mode']}"


def synthesise_music(s: dict, duration: float, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 waveform at AUDIO_SR."""
    n = int(duration * AUDIO_SR)
    t = np.arange(n) / AUDIO_SR
    beat = 60.0 / s["tempo"]
    bar = 4 * beat
    triad = MAJOR if s["mode"] == "major" else MINOR
    root = 48 + s["key"]  # MIDI, around C3
    chord_idx = (t // bar).astype(int) % 4
    out = np.zeros(n)
    n_harmonics = 1 + int(round(s["timbre"] * 5))
    weights = np.array([(1.0 - 0.8 * (1 - s["timbre"])) ** h for h in range(n_harmonics)])
    for step, offset in enumerate(PROGRESSION):
        mask = chord_idx == step
        if not mask.any():
            continue
        for interval in triad:
            f0 = 440.0 * 2 ** ((root + offset + interval - 69) / 12)
            for h, w in enumerate(weights, start=1):
                if f0 * h < AUDIO_SR / 2.2:
                    out[mask] += w * np.sin(2 * np.pi * f0 * h * t[mask])
    out += 0.8 * np.sin(2 * np.pi * 440.0 * 2 ** ((root - 12 - 69) / 12) * t)  # tonic bass
    # Notes re-attack on every beat: a decaying envelope per beat.
    phase = (t % beat) / beat
    out *= 0.25 * (0.35 + 0.65 * np.exp(-4.0 * phase)) / max(weights.sum(), 1.0)
    # Drums: kick on each beat, hi-hats on subdivisions chosen by the drum density.
    kick_env = np.exp(-phase * beat * 30.0)
    out += s["drums"] * 0.8 * kick_env * np.sin(2 * np.pi * 55.0 * (t % beat) * (1 + kick_env))
    sub = beat / 4
    sub_idx = (t // sub).astype(int)
    hats = rng.random(sub_idx.max() + 1) < s["drums"]
    hat_env = np.exp(-((t % sub) / sub) * 25.0) * hats[sub_idx]
    out += 0.35 * s["drums"] * hat_env * rng.standard_normal(n)
    # Loudness sets the RMS level (what the features' dB scale reads), not the peak.
    out *= 0.2 * s["loudness"] / max(np.sqrt(np.mean(out**2)), 1e-9)
    np.clip(out, -1.0, 1.0, out=out)
    return out.astype(np.float32)


def _envelope(y: np.ndarray, n_frames: int) -> np.ndarray:
    per = len(y) // n_frames
    rms = np.sqrt(np.mean(y[: per * n_frames].reshape(n_frames, per) ** 2, axis=1))
    return rms / max(rms.max(), 1e-9)


def picture_style(s: dict) -> dict:
    """What the picture shows, from the music's style: one coarse linear link, three that
    are not linear at all.

    - stripes: 3, 6, 9 or 12 radial stripes as the timbre brightens (linear, coarse);
    - disc: size of the central disc, V-shaped in loudness (smallest at mid loudness);
    - level: brightness from (tempo - 120) * (timbre - 1/2): fast songs brighten with a
      bright timbre, slow ones darken with it (an interaction);
    - hue: red .. green .. blue from (drums - 1/2) * (loudness - mid): loud songs redden
      with drums, quiet ones turn blue (an interaction).
    """
    drums, loud = 2 * s["drums"] - 1, (s["loudness"] - 0.575) / 0.325  # all -1..1
    tempo, timbre = (s["tempo"] - 120.0) / 50.0, 2 * s["timbre"] - 1
    return {
        "stripes": 3 + 3 * int(round(s["timbre"] * 3)),
        "disc": abs(loud),
        "level": 0.575 + 0.325 * tempo * timbre,
        "hue": 0.31 - 0.31 * drums * loud,
    }


def render_picture(s: dict, y: np.ndarray, duration: float) -> np.ndarray:
    """(frames, HEIGHT, WIDTH, 3) uint8 audio-reactive visual."""
    p = picture_style(s)
    n_frames = int(duration * FPS)
    env = _envelope(y, n_frames)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    cx, cy = WIDTH / 2, HEIGHT / 2
    radius_grid = np.hypot(xx - cx, yy - cy)
    angle = np.arctan2(yy - cy, xx - cx)
    rgb_base = _hsv_to_rgb(p["hue"], 0.85, 1.0)
    rgb_alt = _hsv_to_rgb((p["hue"] + 0.5) % 1.0, 0.7, 1.0)
    video = np.empty((n_frames, HEIGHT, WIDTH, 3), np.uint8)
    spin = s["tempo"] / 60.0 * 2 * np.pi / FPS / 4
    for i in range(n_frames):
        e = env[i]
        pattern = 0.5 + 0.5 * np.sin(p["stripes"] * angle + i * spin)
        disc = radius_grid < (8 + 42 * p["disc"]) * (0.8 + 0.2 * e)
        img = (p["level"] * (1 - 0.6 * pattern))[..., None] * rgb_base
        img = np.where(disc[..., None], (0.5 + 0.5 * e) * rgb_alt, img)
        video[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return video


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


def write_mp4(path: Path, video: np.ndarray, audio: np.ndarray, fps: int = FPS) -> None:
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        vs.options = {"preset": "ultrafast", "crf": "28"}
        aus = out.add_stream("aac", rate=AUDIO_SR, layout="mono")
        for img in video:
            out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(vs.encode(None))
        frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
        frame.sample_rate = AUDIO_SR
        frame.time_base = Fraction(1, AUDIO_SR)
        frame.pts = 0
        out.mux(aus.encode(frame))
        out.mux(aus.encode(None))


def make_clip(path: Path, seed: int, duration: float) -> dict:
    rng = np.random.default_rng(seed)
    s = style(rng)
    y = synthesise_music(s, duration, rng)
    write_mp4(path, render_picture(s, y, duration), y)
    return s | {"title": title(s, rng), "genre": genre(s)}


def _make(args):
    return make_clip(*args)


def make_demo_corpus(
    out_dir, n: int, seed: int = 0, duration: float = 10.0, workers: int | None = None
) -> list[Path]:
    """Write `n` clips `clip_0000.mp4`... and `manifest.csv` to `out_dir`; return the paths.

    The manifest has `video,music,title,genre,split` (music empty: the soundtrack is in the
    video) plus the style parameters; the split is 75/12.5/12.5 train/val/test by position.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"clip_{i:04d}.mp4" for i in range(n)]
    jobs = [(p, seed * 1_000_003 + i, duration) for i, p in enumerate(paths)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1 and n > 1:
        # Not a fork of this process: its live connections (a Celery broker's, say) would be
        # the children's too, and closing them there hangs.
        with process_pool(workers) as pool:
            meta = list(pool.map(_make, jobs, chunksize=max(1, n // (4 * workers))))
    else:
        meta = [_make(j) for j in jobs]
    with open(out / "manifest.csv", "w", newline="") as f:
        fields = [
            "video",
            "music",
            "title",
            "genre",
            "split",
            *style(np.random.default_rng()).keys(),
        ]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for i, (p, m) in enumerate(zip(paths, meta, strict=True)):
            split = "train" if i % 8 < 6 else ("val" if i % 8 == 6 else "test")
            writer.writerow({"video": p.name, "music": "", "split": split} | m)
    return paths
