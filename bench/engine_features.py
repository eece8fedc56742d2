"""Engine throughput on this machine: music features (optimised vs naive librosa, same run),
video frame features, VM-NET training steps/s and cross-modal search throughput.

    .venv/bin/python bench/engine_features.py [--tracks 3] [--device cuda]

Prints figures; it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def timed(fn, repeats):
    fn()  # warm-up: numba JIT, librosa filter caches, encoder loading
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timed_with_cpu(fn, repeats):
    """Median wall and CPU seconds (this process) of `fn` after a warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracks", type=int, default=3, help="timed repetitions per measurement")
    p.add_argument("--music-only", action="store_true", help="only the music features figures")
    p.add_argument(
        "--device", default=None, help="torch device for training/search (default: best)"
    )
    args = p.parse_args()

    from engine.corpus import make_clip
    from engine.devices import best_device
    from engine.features.audio import music_features, music_features_naive
    from engine.features.video import frame_features
    from engine.losses import ranking_loss, structure_loss
    from engine.model import VMNet, VMNetConfig
    from engine.search import top_k

    device = best_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.mp4"  # longer than 29.12 s: the whole excerpt is music
        make_clip(full, seed=1, duration=40.0)
        demo = Path(tmp) / "demo.mp4"  # a demo-corpus clip (10 s, zero-padded to 29.12 s)
        make_clip(demo, seed=2, duration=10.0)

        # wall and CPU seconds: on a shared machine the CPU ratio is the steadier figure
        fast, fast_cpu = timed_with_cpu(lambda: music_features(full), args.tracks)
        naive, naive_cpu = timed_with_cpu(lambda: music_features_naive(full), args.tracks)
        print(
            f"music features, 40 s track:  optimised {fast:.3f} s/track, naive {naive:.3f} s/track, speed-up {naive / fast:.2f}x"
        )
        print(
            f"  CPU seconds: optimised {fast_cpu:.3f}, naive {naive_cpu:.3f}, speed-up {naive_cpu / fast_cpu:.2f}x"
        )
        print(
            f"music features, 10 s clip:   optimised {timed(lambda: music_features(demo), args.tracks):.3f} s/clip"
        )
        print(f"load average after music: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.music_only:
            return
        for size in (None, 160, 112):
            t = timed(lambda s=size: frame_features(demo, image_size=s, device="cpu"), args.tracks)
            print(
                f"video features, 10 s clip (10 frames, efficientnet-lite0 @ {size or 224}px, cpu): {t:.3f} s/clip"
            )

    torch.manual_seed(0)
    model = VMNet(VMNetConfig(video_dim=1024, music_dim=1140)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    v = torch.nn.functional.normalize(torch.randn(2000, 1024, device=device), dim=1)
    m = torch.nn.functional.normalize(torch.randn(2000, 1140, device=device), dim=1)

    def step():
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            ve, me = model(v, m)
        ve, me = ve.float(), me.float()
        lvm, lmv = ranking_loss(ve, me, 0.1, 1000)
        loss = lvm + lmv + 0.2 * structure_loss(v, ve) + 0.2 * structure_loss(m, me)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    t = timed(step, args.tracks)
    print(
        f"training (paper's layers, batch 2000, top-K 1000, both losses): {1 / t:.2f} steps/s on {device}"
    )

    rng = np.random.default_rng(0)
    items = rng.normal(size=(100_000, 512)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:2000] + 0.1 * rng.normal(size=(2000, 512)).astype(np.float32)
    t = timed(lambda: top_k(queries, items, 10, device=device), args.tracks)
    print(f"search: top-10 of 100,000 items (d=512): {len(queries) / t:,.0f} queries/s on {device}")


if __name__ == "__main__":
    main()
