import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from engine.features import MediaError
from engine.features.audio import (
    N_FEATURES,
    NUMBA_LOCK,
    SR,
    decode_audio,
    load_excerpt,
    music_features,
    music_features_naive,
)
from engine.features.audio_batch import music_features_batch
from tests.engine.conftest import write_audio
from tests.engine.test_audio_batch import group_columns


def test_music_features_of_an_mp4_soundtrack(clips):
    a = music_features(clips[0])
    assert a.shape == (N_FEATURES,) and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    assert np.array_equal(a, music_features(clips[0]))  # deterministic
    b = music_features(clips[1])
    assert not np.allclose(a, b)  # different styles, different vectors


def test_optimised_path_agrees_with_naive_reference(clips):
    # The demo clips are 3 s zero-padded to 29.12 s. Chroma of digital silence is rounding
    # noise normalised to unit length (in librosa too): chroma-CENS is compared on real music
    # in test_audio_batch, and chroma-STFT's frame maxima here move by up to ~0.01 dB. So is
    # the harmonic part in the frame where the music stops: its sign changes there are
    # float32 rounding noise, which sets the maximum ZCR (0.2676 in librosa, 0.2754 here);
    # ZCR's mean and variance are compared, its maximum on real music in test_audio_batch.
    for clip in clips[:2]:
        got, ref = music_features(clip), music_features_naive(clip)
        for name, cols in group_columns().items():
            cols = cols[:4] if name == "zcr" else cols  # mean, variance (both components)
            if name != "chroma_cens":
                np.testing.assert_allclose(got[cols], ref[cols], rtol=1e-4, atol=1e-2, err_msg=name)


def test_music_features_is_one_row_of_the_batch(clips):
    batch = music_features_batch(clips[:2], device="cpu", workers=0)
    np.testing.assert_array_equal(music_features(clips[1]), batch[1])


def test_waveform_input_resampled_and_mixed_to_mono():
    sr = 44_100
    t = np.arange(int(35 * sr)) / sr  # longer than 29.12 s: the centre is kept
    left = 0.3 * np.sin(2 * np.pi * 440 * t) * (t > 17)  # silent first half
    stereo = np.stack([left, left])
    y = load_excerpt((stereo, sr))
    assert y.size == int(round(29.12 * SR))
    # centred: starts at (35 - 29.12) / 2 = 2.94 s, so the tone begins 14.06 s in
    onset = np.argmax(np.abs(y) > 0.1) / SR
    assert onset == pytest.approx(17 - 2.94, abs=0.01)
    assert music_features((stereo, sr)).shape == (N_FEATURES,)


def test_decode_audio_seeks_to_the_excerpt(tmp_path):
    # 120 s, a different tone each second: the decoded excerpt must be the right seconds.
    sr = 12_000
    t = np.arange(120 * sr) / sr
    freqs = 200 + 20 * (t.astype(int) % 60)
    path = write_audio(tmp_path / "long.m4a", 0.4 * np.sin(2 * np.pi * np.cumsum(freqs) / sr), sr)
    y = decode_audio(path, sr=sr, offset=100.0, duration=2.0)
    assert y.size == 2 * sr
    for second, expected in ((0, 200 + 20 * 40), (1, 200 + 20 * 41)):
        chunk = y[second * sr + 1000 : (second + 1) * sr - 1000]
        spectrum = np.abs(np.fft.rfft(chunk * np.hanning(chunk.size)))
        peak = np.argmax(spectrum) * sr / chunk.size
        assert peak == pytest.approx(expected, abs=5)


@pytest.mark.parametrize(("codec", "name"), [("pcm_s16le", "long.wav"), ("aac", "long.m4a")])
def test_decode_audio_mixes_the_channels_of_every_frame(tmp_path, codec, name):
    """70 s of stereo (a different tone each side; 16-bit PCM, converted to planar float,
    and AAC), decoded whole: every frame's channel mean, in order, past the first buffer."""
    sr = 12_000
    t = np.arange(70 * sr) / sr
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)])
    path = tmp_path / name
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=sr, layout="stereo")
        for start in range(0, stereo.shape[1], 1024):
            chunk = np.ascontiguousarray(stereo[:, start : start + 1024], np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = sr, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with av.open(str(path)) as container:
        planar = av.AudioResampler(format="fltp")
        frames = [f for frame in container.decode(audio=0) for f in planar.resample(frame)]
    expected = np.concatenate([f.to_ndarray() for f in frames], axis=1).mean(axis=0)
    y = decode_audio(path, sr=sr)
    assert y.size >= 70 * sr and np.array_equal(y, expected)


def test_short_tracks_are_zero_padded(tmp_path):
    sr = 22_050
    t = np.arange(3 * sr) / sr
    path = write_audio(tmp_path / "short.mp4", 0.5 * np.sin(2 * np.pi * 330 * t), sr, video=True)
    y = load_excerpt(path)
    assert y.size == int(round(29.12 * SR))
    assert np.abs(y[: 2 * SR]).max() > 0.3 and np.abs(y[4 * SR :]).max() == 0


def test_silent_and_unreadable_media_raise_media_error(tmp_path):
    silent = write_audio(tmp_path / "silent.m4a", np.zeros(3 * 12_000), 12_000)
    with pytest.raises(MediaError, match="silent"):
        music_features(silent)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a media file" * 100)
    with pytest.raises(MediaError):
        music_features(junk)
    with pytest.raises(MediaError):
        music_features(tmp_path / "missing.mp3")


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
def test_processes_warm_the_numba_cache_one_after_the_other():
    """A process warming up waits while another holds the warm-up lock (numba's cache files
    written by one process and read by another at the same time crash the reader)."""
    lock = os.open(NUMBA_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        warm = subprocess.Popen(
            [sys.executable, "-c", "from engine.features.audio import *; warm_numba_cache()"],
            cwd=Path(__file__).resolve().parents[2],
        )
        waiting = f"-> FLOCK  ADVISORY  WRITE {warm.pid} "
        deadline = time.monotonic() + 120
        while waiting not in Path("/proc/locks").read_text() and warm.poll() is None:
            assert time.monotonic() < deadline, "the warm-up never asked for the lock"
            time.sleep(0.1)
        assert warm.poll() is None, "the warm-up ran while another process held the lock"
    finally:
        os.close(lock)
    assert warm.wait(timeout=300) == 0
