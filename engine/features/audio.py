"""Music features of Sec. III-A / IV-B: 1140 statistics of Table I's frame features.

12 kHz mono, the centred 29.12 s (zero-padded when shorter), harmonic/percussive split,
190 features per component and frame (n_fft 512, hop 256), then per-dimension mean,
variance and max over frames: 2 x 190 x 3 = 1140.

Per component, the frame layout is: chroma-STFT 12, chroma-CENS 12, mel 96, MFCC 20,
delta-MFCC 20, delta2-MFCC 20, RMS 1, centroid 1, bandwidth 1, rolloff 1, poly order 1 (2),
poly order 2 (3), zero-crossing rate 1 = 190. The harmonic component comes first.

Log-amplitude scaling: every non-negative feature (chroma, CENS, mel, RMS, centroid,
bandwidth, rolloff, ZCR) is converted to dB with a fixed reference (1.0), so loudness and
brightness stay comparable across tracks; MFCCs are already log-domain and the polynomial
coefficients are signed, so they are kept as they are. (The authors' release applied
`logamplitude(ref=max)` to everything, which clips signed features to the floor.)

HPSS uses the same frames as the features (n_fft 512, hop 256, librosa's 31-bin median
kernels), and so do the mel bands (96) and the MFCCs (20, from those 96 bands); the
release used librosa's defaults (n_fft 2048, 128 bands) at a sample rate its audio did not
have. RMS goes through the same dB conversion as the power features (10·log10 of an
amplitude: half the 20·log10 scale, which the standardisation before the network removes).

`music_features` is the hot path and one row of `audio_batch.music_features_batch` (one
tensor implementation of the maths): one STFT of the mixture for HPSS, one inverse STFT
and one re-analysis STFT per component (a masked STFT is not a consistent one; this is
what the features of y_h / y_p really see), every spectral feature derived from it, and
librosa's multirate CQT for chroma-CENS, computed on the CPU one track at a time.
`music_features_naive` is the straightforward version (each librosa feature call computes
its own transforms), kept as the test oracle and the benchmark baseline; on real music every
feature group agrees with it to float32 rounding (see tests/engine/test_audio_batch.py; CENS
to 10% of the spread). Digital silence, e.g. the zero padding of a track shorter than the
excerpt, is where they part: librosa normalises rounding noise into unit chroma there, the
batch path keeps the floor, so chroma-CENS statistics of padded tracks differ.
"""

from __future__ import annotations

import fcntl
import functools
import math
import os
from pathlib import Path

import av
import librosa
import numpy as np
import soxr

from engine.features import MediaError

SR = 12_000
DURATION = 29.12
N_FFT = 512
HOP = 256
N_MELS = 96
N_MFCC = 20
N_FRAME_FEATURES = 190
N_FEATURES = 2 * N_FRAME_FEATURES * 3  # 1140
SILENCE_RMS = 1e-5
# Beside the numba cache of this package (librosa's is in the same environment): the processes
# that share the caches share the lock, whoever runs them.
NUMBA_LOCK = Path(__file__).with_name("__pycache__") / "numba-warm.lock"


def decode_audio(
    source, sr: int = SR, offset: float | None = None, duration: float | None = None
) -> np.ndarray:
    """Decode mono float32 audio at `sr` from `offset` seconds for `duration` seconds.

    Seeks to `offset` instead of decoding from the start, and stops once `duration` is
    covered, so a 30 s excerpt of a two-hour file costs about 30 s of decoding. Works for
    anything FFmpeg reads (MP3, OGG, M4A, WAV, the audio track of an MP4, ...).
    """
    offset = max(0.0, offset or 0.0)
    try:
        container = av.open(str(source))
    except (av.FFmpegError, OSError) as exc:
        raise MediaError(f"{source}: cannot open media ({exc})") from exc
    with container:
        if not container.streams.audio:
            raise MediaError(f"{source}: no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate or sr
        # Decoders of compressed audio give planar float; anything else is converted.
        convert = av.AudioResampler(format="fltp", rate=rate)
        if offset > 0:
            # Seeks to the keyframe at or before `offset`; the exact start is cut below.
            container.seek(int(offset * av.time_base), any_frame=False)
        wanted = None if duration is None else int(round(duration * rate))
        # Each frame (1024 samples of AAC) is mixed to mono straight into one buffer, and
        # the decoder gets its frame back at once: a FIFO's copies, growth and read cost
        # as much as the decoder itself.
        mono = np.empty(0, np.float32)
        have = 0
        start_time = None
        skip = 0
        try:
            for packet in container.demux(stream):
                for frame in stream.codec_context.decode(packet):
                    if start_time is None:
                        start_time = float(frame.time) if frame.time is not None else 0.0
                        skip = max(0, int(round((offset - start_time) * rate)))
                        mono = np.empty(skip + (wanted or 60 * rate) + rate, np.float32)
                    frames = [frame] if frame.format.name == "fltp" else convert.resample(frame)
                    for out in frames:
                        if have + out.samples > len(mono):
                            mono = np.concatenate([mono, np.empty_like(mono)])
                        _mix_down(out, mono[have : have + out.samples])
                        have += out.samples
                if wanted is not None and have >= skip + wanted:
                    break
        except av.FFmpegError as exc:
            raise MediaError(f"{source}: cannot decode audio ({exc})") from exc
    if not have:
        raise MediaError(f"{source}: no audio decoded")
    y = mono[skip:have] if wanted is None else mono[skip : min(have, skip + wanted)]
    # soxr's high-quality resampler (librosa's default), several times faster than
    # FFmpeg's default resampler.
    if rate != sr:
        y = soxr.resample(y, rate, sr, quality="HQ")
    return np.ascontiguousarray(y, dtype=np.float32)


def _mix_down(frame: av.AudioFrame, out: np.ndarray) -> None:
    """The channel mean of a planar float frame into `out`, in the order numpy's mean over
    the channels takes (a running sum, then one division)."""
    planes = [np.frombuffer(plane, np.float32, frame.samples) for plane in frame.planes]
    if len(planes) == 1:
        out[:] = planes[0]
        return
    np.add(planes[0], planes[1], out=out)
    for plane in planes[2:]:
        out += plane
    out /= len(planes)


def _media_duration(path) -> float | None:
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except (av.FFmpegError, OSError) as exc:
        raise MediaError(f"{path}: cannot open media ({exc})") from exc
    return None


def load_excerpt(source) -> np.ndarray:
    """The centred 29.12 s at 12 kHz mono (zero-padded at the end when shorter)."""
    n = int(round(DURATION * SR))
    if isinstance(source, tuple):
        y, sr = source
        y = np.asarray(y, dtype=np.float32)
        if y.ndim == 2:  # (channels, samples)
            y = librosa.to_mono(y)
        if sr != SR:
            y = librosa.resample(y, orig_sr=sr, target_sr=SR)
        start = max(0, (y.size - n) // 2)
        y = y[start : start + n]
    else:
        total = _media_duration(source)
        offset = None if total is None else max(0.0, (total - DURATION) / 2)
        y = decode_audio(source, SR, offset=offset, duration=DURATION)
        if total is None and y.size > n:  # duration unknown: decoded it all, centre now
            start = (y.size - n) // 2
            y = y[start : start + n]
    if y.size == 0 or not np.all(np.isfinite(y)):
        raise MediaError(f"{_name(source)}: no usable audio samples")
    if float(np.sqrt(np.mean(np.square(y, dtype=np.float64)))) < SILENCE_RMS:
        raise MediaError(f"{_name(source)}: audio is silent")
    return np.pad(y, (0, n - y.size)) if y.size < n else y[:n]


def _name(source) -> str:
    return str(source) if isinstance(source, str | Path) else "waveform"


def _db(x: np.ndarray) -> np.ndarray:
    return librosa.power_to_db(x, ref=1.0, amin=1e-10, top_db=None)


def _summarise(frames: np.ndarray) -> np.ndarray:
    """(380, T) frame features -> (1140,) mean, variance, max."""
    stats = [frames.mean(axis=1), frames.var(axis=1), frames.max(axis=1)]
    return np.concatenate(stats).astype(np.float32)


def _stack(chroma, cens, mel, mfcc, rms, centroid, bandwidth, rolloff, poly1, poly2, zcr):
    """One component's frame features in Table I order -> (190, T)."""
    delta = librosa.feature.delta(mfcc)
    delta2 = librosa.feature.delta(mfcc, order=2)
    rows = [
        _db(chroma),
        _db(cens),
        _db(mel),
        mfcc,
        delta,
        delta2,
        _db(rms),
        _db(centroid),
        _db(bandwidth),
        _db(rolloff),
        poly1,
        poly2,
        _db(zcr),
    ]
    return np.vstack(rows)


def music_features(source) -> np.ndarray:
    """(1140,) float32 music vector of a file path or a `(waveform, sample_rate)` tuple:
    one row of `music_features_batch`, computed on the CPU in this process."""
    from engine.features.audio_batch import music_features_batch, one_torch_thread

    with one_torch_thread():  # one track gains little from threads, and loses much on a busy CPU
        return music_features_batch([source], device="cpu", workers=0)[0]


@functools.cache
def warm_numba_cache(reference: bool = False) -> None:
    """Compile every numba function the music features use (librosa's and ours; with
    `reference`, those of `music_features_naive` too), or load it from numba's on-disk cache,
    once in this process.

    Call it before starting processes that compute music features: numba's cache files can
    be corrupted when several processes compile the same gufunc at once, and a process that
    loads such a pair crashes (numba issue #10128). Once the cache is written, the processes
    only read it. Independent processes on one host (two workers, two test runs) warm up one
    after the other, under a file lock, so that none reads what another is still writing.
    """
    noise = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    try:  # read-only, so that a lock file another user created serves as well
        NUMBA_LOCK.parent.mkdir(exist_ok=True)
        lock = os.open(NUMBA_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:  # a read-only installation: its caches were written when it was made
        lock = None
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        music_features((noise, SR))
        if reference:
            music_features_naive((noise, SR))
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock


def music_features_naive(source) -> np.ndarray:
    """Reference implementation: every feature call recomputes its own transform."""
    y = load_excerpt(source)
    components = []
    for part in librosa.effects.hpss(y, n_fft=N_FFT, hop_length=HOP):
        kw = {"y": part, "sr": SR, "n_fft": N_FFT, "hop_length": HOP}
        components.append(
            _stack(
                librosa.feature.chroma_stft(**kw),
                librosa.feature.chroma_cens(y=part, sr=SR, hop_length=HOP),
                librosa.feature.melspectrogram(**kw, n_mels=N_MELS),
                librosa.feature.mfcc(**kw, n_mels=N_MELS, n_mfcc=N_MFCC),
                librosa.feature.rms(y=part, frame_length=N_FFT, hop_length=HOP),
                librosa.feature.spectral_centroid(**kw),
                librosa.feature.spectral_bandwidth(**kw),
                librosa.feature.spectral_rolloff(**kw),
                librosa.feature.poly_features(**kw, order=1),
                librosa.feature.poly_features(**kw, order=2),
                librosa.feature.zero_crossing_rate(part, frame_length=N_FFT, hop_length=HOP),
            )
        )
    return _summarise(np.vstack(components))


assert math.isclose(N_FEATURES, 1140)
