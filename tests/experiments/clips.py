"""Real, tiny music videos for the tests, encoded with PyAV.

Clip `i` has a picture and a soundtrack that both follow one hidden value (the hue and moving
stripes of the picture, the pitch and beat of the tone), so a retrieval system trained on a
few dozen of them has something real to learn.
"""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def music_video(
    path: Path,
    i: int = 0,
    seconds: float = 3.0,
    size: tuple[int, int] = (64, 48),
    fps: int = 10,
    audio: bool = True,
    video: bool = True,
    silent: bool = False,
    rate: int = 22050,
) -> Path:
    """Write an MP4 with an H.264 picture and/or an AAC soundtrack; returns `path`."""
    value = (i * 0.61803) % 1.0  # the hidden value, spread over [0, 1)
    width, height = size
    with av.open(str(path), "w", format="mp4") as out:
        if video:
            vs = out.add_stream("libx264", rate=fps)
            vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
            vs.options = {"preset": "ultrafast"}
        if audio:
            aus = out.add_stream("aac", rate=rate)
            aus.layout = "mono"
        if video:
            colour = np.array([255 * value, 255 * (1 - value), 128], np.uint8)
            for n in range(int(seconds * fps)):
                frame = np.empty((height, width, 3), np.uint8)
                frame[:] = colour
                stripe = int((n * (1 + 5 * value)) % width)
                frame[:, stripe : stripe + 4] = 255
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                vf.pts = n
                vf.time_base = Fraction(1, fps)
                out.mux(vs.encode(vf))
            out.mux(vs.encode(None))
        if audio:
            t = np.arange(int(seconds * rate)) / rate
            beat = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (1 + 3 * value) * t))
            tone = 0.3 * beat * np.sin(2 * np.pi * (200 + 600 * value) * t)
            tone = (0 * tone if silent else tone).astype(np.float32)
            for start in range(0, len(tone), 1024):
                af = av.AudioFrame.from_ndarray(
                    tone[None, start : start + 1024], format="fltp", layout="mono"
                )
                af.sample_rate, af.pts, af.time_base = rate, start, Fraction(1, rate)
                out.mux(aus.encode(af))
            out.mux(aus.encode(None))
    return path


def truncated(path: Path, source: Path, keep: float = 0.5) -> Path:
    """The first `keep` share of `source`'s bytes: what an interrupted copy leaves."""
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
