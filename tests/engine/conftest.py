"""Real media for the engine tests: short clips written by the demo corpus generator."""

from fractions import Fraction

import av
import numpy as np
import pytest

from engine.corpus import make_demo_corpus


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """Four 3-second MP4 music videos (H.264 + AAC) with different styles."""
    out = tmp_path_factory.mktemp("clips")
    return make_demo_corpus(out, 4, seed=7, duration=3.0, workers=1)


def write_audio(path, samples: np.ndarray, sr: int, codec: str = "aac", video: bool = False):
    """Write mono float samples as an audio file (optionally with a black video track)."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=1) if video else None
        stream = out.add_stream(codec, rate=sr, layout="mono")
        if vs is not None:
            vs.width, vs.height, vs.pix_fmt = 32, 32, "yuv420p"
            for _ in range(max(1, int(len(samples) / sr))):
                img = np.zeros((32, 32, 3), np.uint8)
                out.mux(vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            out.mux(vs.encode(None))
        frame = av.AudioFrame.from_ndarray(
            samples[None, :].astype(np.float32), format="flt", layout="mono"
        )
        frame.sample_rate, frame.time_base, frame.pts = sr, Fraction(1, sr), 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path
