"""The demo corpus at full size: 400 clips, VM-NET vs the linear baselines vs chance.

    .venv/bin/python bench/corpus_learnability.py [--pairs 400] [--train 300] [--seed 0]
                                                   [--train-seed 0] [--out DIR]

Generates the corpus (or reuses DIR's features.npz), extracts features in parallel
(efficientnet-lite0 at 112 px for the 160x120 clips), trains on the first `--train` pairs
(the last 50 of them for early stopping only) and prints Recall@1/10/25 in both directions
on the rest. Every system sees the same features (DEMO_FEATURES); VM-NET trains with
DEMO_VMNET_CONFIG, the settings the demo uses.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.corpus import DEMO_FEATURES, DEMO_VMNET_CONFIG, make_demo_corpus
from engine.extract import extract_folder
from engine.pipeline import Features, evaluate, train_system


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0, help="seed of the corpus")
    ap.add_argument("--train-seed", type=int, default=0, help="seed of VM-NET's training")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="demo-corpus-"))
    cached = out / "features.npz"
    if not cached.exists():
        start = time.perf_counter()
        paths = make_demo_corpus(out / "clips", args.pairs, seed=args.seed, duration=args.duration)
        keys, frames, music, errors = extract_folder(paths, image_size=112)
        assert not errors, errors
        Features([p.name for p in keys], frames, music).save(cached)
        print(f"corpus + features: {time.perf_counter() - start:.0f} s")
    features = Features.load(cached)
    order = np.argsort(features.keys)
    train = features.subset(list(order[: args.train - 50]))
    val = features.subset(list(order[args.train - 50 : args.train]))
    test = features.subset(list(order[args.train :]))
    print(f"{len(train)} train + {len(val)} val pairs, {len(test)} held out; Recall@K in %")
    print(f"{'system':8s} {'V2M R@1/10/25':>16s} {'M2V R@1/10/25':>16s} {'train s':>8s}")
    chance = None
    for kind in ("vmnet", "cca", "pls", "chance"):
        start = time.perf_counter()
        if kind == "chance":
            r = {"V2M": chance, "M2V": chance}
        else:
            config = (
                DEMO_VMNET_CONFIG | {"seed": args.train_seed} if kind == "vmnet" else DEMO_FEATURES
            )
            r = evaluate(train_system(kind, train, val, config), test)
            chance = r["chance"]
        v2m, m2v = (
            "/".join(f"{100 * r[d][f'R@{k}']:.0f}" for k in (1, 10, 25)) for d in ("V2M", "M2V")
        )
        print(f"{kind:8s} {v2m:>16s} {m2v:>16s} {time.perf_counter() - start:8.0f}")


if __name__ == "__main__":
    main()
