"""Media for the participant pages, made with PyAV: a muted web video and an audio clip.

A music video becomes a muted H.264 MP4 (yuv420p, at most 480 px tall, `+faststart` so it
starts playing before it has fully downloaded) and an AAC M4A clip of its soundtrack, both the
centred `clip_s` seconds (29.12 s, the paper's music window, unless configured). Decoding
starts at a seek to the clip, so a two-hour file costs no more than a short one. Anything that
cannot be used raises the engine's MediaError with a message a researcher can act on.
"""

import contextlib
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from engine.features import MediaError

CLIP_S = 29.12
MAX_HEIGHT = 480
MAX_FPS = 30
AUDIO_RATE = 44100
SILENCE_DBFS = -60.0  # a clip whose peak stays below this is silent
TRUNCATION_TOLERANCE_S = 1.0  # decoded media may end this much before the container says
MIN_ITEM_S = 1.0  # shorter items cannot be judged (nor pass a minimum listening time)
MIN_SAMPLE_RATE = 8000  # below telephone quality music is not what the study asks about


@dataclass(frozen=True)
class MediaInfo:
    duration_s: float
    width: int | None = None  # None: no video stream
    height: int | None = None
    fps: float | None = None
    sample_rate: int | None = None  # None: no audio stream
    channels: int | None = None

    @property
    def has_video(self) -> bool:
        return self.width is not None

    @property
    def has_audio(self) -> bool:
        return self.sample_rate is not None


def probe(path: str | os.PathLike) -> MediaInfo:
    """Duration and stream properties, read from the container's headers (nothing decoded)."""
    with _open(path) as container:
        video = _first(container.streams.video)
        audio = _first(container.streams.audio)
        duration = _duration(container)
        if video is None and audio is None:
            raise MediaError(f"{Path(path).name}: has neither a video nor an audio stream")
        if not duration or duration <= 0:
            raise MediaError(f"{Path(path).name}: zero-length media (duration 0 s)")
        return MediaInfo(
            duration_s=duration,
            width=video.codec_context.width if video else None,
            height=video.codec_context.height if video else None,
            fps=float(video.average_rate) if video and video.average_rate else None,
            sample_rate=audio.codec_context.sample_rate if audio else None,
            channels=audio.codec_context.channels if audio else None,
        )


def check_usable(info: MediaInfo, name: str) -> None:
    """Refuse media a participant could not judge: too short, or sound of unusable format."""
    if info.duration_s < MIN_ITEM_S:
        raise MediaError(f"{name}: too short ({info.duration_s:.2f} s; at least {MIN_ITEM_S:g} s)")
    if info.has_audio and not info.channels:
        raise MediaError(f"{name}: the audio track has no channels")
    if info.has_audio and info.sample_rate < MIN_SAMPLE_RATE:
        raise MediaError(
            f"{name}: audio sampled at {info.sample_rate} Hz (at least {MIN_SAMPLE_RATE} Hz)"
        )


def clip_window(duration_s: float, clip_s: float | None = CLIP_S) -> tuple[float, float]:
    """(start, length) of the centred `clip_s` seconds; the whole file when it is shorter."""
    if clip_s is None or duration_s <= clip_s:
        return 0.0, duration_s
    return (duration_s - clip_s) / 2, clip_s


def make_items(
    video_path: str | os.PathLike,
    video_out: str | os.PathLike,
    music_out: str | os.PathLike,
    music_path: str | os.PathLike | None = None,
    clip_s: float | None = CLIP_S,
) -> MediaInfo:
    """A pair's study media: the muted picture of `video_path` and the soundtrack of
    `music_path` (default: the same file), each its centred clip. Returns the video's info."""
    video_info = probe(video_path)
    if not video_info.has_video:
        raise MediaError(f"{Path(video_path).name}: no video stream")
    music_info = video_info if music_path is None else probe(music_path)
    if not music_info.has_audio:
        raise MediaError(f"{Path(music_path or video_path).name}: no audio track")
    check_usable(video_info, Path(video_path).name)
    check_usable(music_info, Path(music_path or video_path).name)
    web_video(video_path, video_out, *clip_window(video_info.duration_s, clip_s))
    audio_clip(music_path or video_path, music_out, *clip_window(music_info.duration_s, clip_s))
    return video_info


def web_video(src, dst, start: float = 0.0, length: float | None = None):
    """Write `length` seconds of `src`'s picture from `start` as a muted, streamable MP4."""
    name = Path(src).name
    with _open(src) as source:
        stream = _first(source.streams.video)
        if stream is None:
            raise MediaError(f"{name}: no video stream")
        end = start + (length if length is not None else _duration(source) - start)
        stream.thread_type = "AUTO"
        fps = min(float(stream.average_rate or 25), MAX_FPS)
        rate = Fraction(fps).limit_denominator(1001)
        width, height = _web_size(stream.codec_context.width, stream.codec_context.height)
        with _h264_output(dst, rate, width, height) as (out, encoder):
            last_pts, decoded_until = -1, None
            for frame in _decode_from(source, stream, start, name):
                t = frame.time
                if t is None or t < start - 1e-3:
                    continue
                if t >= end:
                    break
                decoded_until = t
                pts = round((t - start) * rate)  # constant rate: drop frames that would repeat
                if pts <= last_pts:
                    continue
                last_pts = pts
                picture = frame.reformat(width=width, height=height, format="yuv420p")
                picture.pts, picture.time_base = pts, 1 / rate
                out.mux(encoder.encode(picture))
            out.mux(encoder.encode(None))
    _check_complete(name, "video", decoded_until, start, end - 1 / fps)


def audio_clip(src, dst, start: float = 0.0, length: float | None = None):
    """Write `length` seconds of `src`'s sound from `start` as an AAC M4A (stereo, 44.1 kHz)."""
    name = Path(src).name
    with _open(src) as source:
        stream = _first(source.streams.audio)
        if stream is None:
            raise MediaError(f"{name}: no audio track")
        end = start + (length if length is not None else _duration(source) - start)
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_RATE)
        chunks, first_time = [], None
        for frame in _decode_from(source, stream, start, name):
            if first_time is None:
                first_time = frame.time or 0.0
            if frame.time is not None and frame.time >= end:
                break
            chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
    if not chunks:
        raise MediaError(f"{name}: no decodable audio (truncated or zero-length?)")
    samples = np.concatenate(chunks, axis=1)
    skip = max(0, round((start - first_time) * AUDIO_RATE))
    samples = samples[:, skip : skip + round((end - start) * AUDIO_RATE)]
    decoded_until = first_time + (skip + samples.shape[1]) / AUDIO_RATE
    _check_complete(name, "audio", decoded_until, start, end)
    peak = float(np.abs(samples).max(initial=0.0))
    if peak <= 10 ** (SILENCE_DBFS / 20):
        level = "digital silence" if peak == 0 else f"peak {20 * math.log10(peak):.0f} dBFS"
        raise MediaError(f"{name}: the audio clip is silent ({level})")
    _write_aac(samples, dst)


def broken_items(
    video_out: str | os.PathLike,
    music_out: str | os.PathLike,
    seconds: float,
    size: tuple[int, int] = (320, 180),
    fps: float = 10,
    sizes: tuple[int, int] = (0, 0),
):
    """The media of a catch question's broken candidate: a black, frozen muted video and a
    silent audio clip, `seconds` long, in the same formats as every other item. `sizes`:
    the bytes each file (video, music) is padded to, where it is smaller (black and silence
    compress to almost nothing), with an ISO 'free' box that players skip."""
    width, height = size
    rate = Fraction(fps).limit_denominator(1001)
    with _h264_output(video_out, rate, width, height) as (out, encoder):
        black = np.zeros((height, width, 3), np.uint8)
        for n in range(max(1, round(seconds * rate))):
            frame = av.VideoFrame.from_ndarray(black, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = n, 1 / rate
            out.mux(encoder.encode(frame))
        out.mux(encoder.encode(None))
    _write_aac(np.zeros((2, round(seconds * AUDIO_RATE)), np.float32), music_out)
    for path, padded in zip((video_out, music_out), sizes, strict=True):
        if (missing := padded - os.path.getsize(path)) >= 8:  # a box: 4-byte size, 4-byte type
            with open(path, "ab") as f:
                f.write(missing.to_bytes(4, "big") + b"free" + bytes(missing - 8))


@contextlib.contextmanager
def _h264_output(dst, rate: Fraction, width: int, height: int):
    """(container, encoder): a streamable MP4 (index first) with one H.264 stream, the
    format of every item's video."""
    with av.open(str(dst), "w", format="mp4", container_options={"movflags": "+faststart"}) as out:
        encoder = out.add_stream("libx264", rate=rate)
        encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
        encoder.options = {"preset": "veryfast", "crf": "23"}
        yield out, encoder


def _write_aac(samples: np.ndarray, dst):
    with av.open(str(dst), "w", format="ipod", container_options={"movflags": "+faststart"}) as out:
        encoder = out.add_stream("aac", rate=AUDIO_RATE)
        encoder.layout = "stereo"
        encoder.bit_rate = 128_000
        encoder.options = {"aac_coder": "fast"}  # 2.5x faster than the default, fine at 128k
        step = 1024  # AAC frame size
        for offset in range(0, samples.shape[1], step):
            chunk = np.ascontiguousarray(samples[:, offset : offset + step], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = (
                AUDIO_RATE,
                offset,
                Fraction(1, AUDIO_RATE),
            )
            out.mux(encoder.encode(frame))
        out.mux(encoder.encode(None))


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path.name}: file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path.name}: empty file (0 bytes)")
    try:
        return av.open(str(path))
    except av.FFmpegError as error:
        raise MediaError(f"{path.name}: not a readable media file ({error.strerror})") from error


def _decode_from(container, stream, start: float, name: str):
    """Decoded frames of `stream` from the last keyframe at or before `start`."""
    try:
        if start > 0 and stream.time_base:
            container.seek(int(start / stream.time_base), stream=stream)
        yield from container.decode(stream)
    except av.FFmpegError as error:
        raise MediaError(f"{name}: cannot be decoded, damaged or truncated ({error})") from error


def _check_complete(name, what, decoded_until, start, end):
    if decoded_until is None:
        raise MediaError(f"{name}: no decodable {what} (truncated or zero-length?)")
    if decoded_until < end - TRUNCATION_TOLERANCE_S:
        raise MediaError(
            f"{name}: the {what} stops at {decoded_until:.1f} s, before the clip's end at "
            f"{end:.1f} s that the file's stated length promises (truncated?)"
        )


def _web_size(width: int, height: int) -> tuple[int, int]:
    """Keep the aspect ratio, at most MAX_HEIGHT tall; even sizes, as yuv420p needs."""
    scale = min(1.0, MAX_HEIGHT / height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _duration(container) -> float:
    if container.duration:
        return container.duration / av.time_base
    durations = [
        float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base
    ]
    return max(durations, default=0.0)


def _first(streams):
    return streams[0] if streams else None
