"""Command line: python -m engine {demo-corpus,extract,train,evaluate,baselines,embed,search} --help"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


def _splits(features, manifest: str | None, seed: int = 0) -> dict[str, list[int]]:
    """Row indices per split: from the manifest's `split` column, else 75/12.5/12.5."""
    if manifest:
        with open(manifest, newline="") as f:
            reader = csv.DictReader(f)
            if "video" not in (reader.fieldnames or ()):
                raise ValueError(f"{manifest}: no 'video' column (and 'split': train, val, test)")
            split_of = {row["video"]: row.get("split", "") for row in reader}
        # A key is the video's path below the folder `extract` read; the manifest may name
        # the file alone where no other file has that name.
        names = Counter(Path(key).name for key in features.keys)
        out = {"train": [], "val": [], "test": []}
        for i, key in enumerate(features.keys):
            name = Path(key).name
            split = split_of.get(key, split_of.get(name) if names[name] == 1 else None)
            if split in out:
                out[split].append(i)
        if not any(out.values()):
            raise ValueError(f"{manifest} gives a split to none of the {len(features)} videos")
        return out
    order = np.random.default_rng(seed).permutation(len(features))
    a, b = int(0.75 * len(order)), int(0.875 * len(order))
    return {"train": sorted(order[:a]), "val": sorted(order[a:b]), "test": sorted(order[b:])}


def _manifest_for(args) -> str | None:
    if args.manifest:
        return args.manifest
    guess = Path(args.features).with_name("manifest.csv")
    return str(guess) if guess.exists() else None


def cmd_demo_corpus(args):
    from engine.corpus import make_demo_corpus

    t0 = time.perf_counter()
    paths = make_demo_corpus(args.out, args.n, args.seed, args.duration, args.workers)
    dt = time.perf_counter() - t0
    print(f"wrote {len(paths)} clips and manifest.csv to {args.out} in {dt:.1f} s")


def cmd_extract(args):
    from engine.extract import extract_folder
    from engine.features.video import input_size
    from engine.files import find_videos
    from engine.pipeline import Features

    input_size(args.encoder, args.image_size)  # a bad size fails here, not once per file
    folder = Path(args.folder)
    paths = find_videos(folder)
    if not paths:
        sys.exit(f"no video files under {folder}")
    settings = {
        "encoder": args.encoder, "image_size": args.image_size,
        "pretrained": not args.random_weights,
    }  # fmt: skip
    partial = Path(f"{args.out}.partial")  # what a stopped run had: the next one goes on
    done = _resumed(partial, settings, folder, paths)

    def save(keys, frames, music):
        rel = [str(k.relative_to(folder)) for k in keys]
        Features(rel, frames, music, settings).save(partial)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a job killed: save, as Ctrl-C
    t0 = time.perf_counter()
    try:
        keys, frames, music, errors = extract_folder(
            paths, args.workers, encoder=args.encoder, pretrained=not args.random_weights,
            image_size=args.image_size, device=args.device, done=done, save=save,
        )  # fmt: skip
    except KeyboardInterrupt:
        if partial.exists():
            print(f"stopped: what was extracted is in {partial}; the same command goes on "
                  "from there", file=sys.stderr)  # fmt: skip
        raise
    dt = time.perf_counter() - t0
    if keys:
        save(keys, frames, music)
        os.replace(partial, args.out)
    written = (
        f"-> {args.out}"
        if keys
        else f"nothing written (no file could be read; {args.out} unchanged)"
    )
    resumed = f", {len(done)} of them from {partial}" if done else ""
    print(
        f"extracted {len(keys)} of {len(paths)} files{resumed} in {dt:.1f} s "
        f"({dt / max(len(paths) - len(done), 1):.2f} s/file) {written}; {len(errors)} failed"
    )
    if errors:
        sys.exit(1)


def _resumed(partial: Path, settings: dict, folder: Path, paths) -> dict:
    """The features a stopped run saved in `partial`, by path, if they were extracted as
    `settings` asks; files no longer among `paths` (found in `folder`) are left out."""
    from engine.pipeline import Features

    if not partial.exists():
        return {}
    saved = Features.load(partial)
    if saved.settings != settings:
        raise ValueError(
            f"{partial} (a stopped run's features) was extracted with {saved.settings}, not "
            f"{settings}: run with its options to go on, or delete it to start afresh"
        )
    rows, present = zip(saved.keys, saved.frames, saved.music, strict=True), set(paths)
    return {folder / k: (f, m) for k, f, m in rows if folder / k in present}


def cmd_train(args):
    from engine.pipeline import Features, evaluate, train_system

    features = Features.load(args.features)
    split = _splits(features, _manifest_for(args), args.seed)
    config = json.loads(args.config) if args.config else {}
    if not isinstance(config, dict):
        raise ValueError(f'--config is a JSON object, e.g. {{"top_k": 100}}, not {args.config}')
    config.setdefault("seed", args.seed)
    if args.kind == "vmnet" and args.epochs is not None:
        config["max_epochs"] = args.epochs
    system = train_system(
        args.kind, features.subset(split["train"]),
        features.subset(split["val"]) if split["val"] else None, config,
    )  # fmt: skip
    if split["test"]:
        system.metrics["test"] = evaluate(system, features.subset(split["test"]))
        print(json.dumps(system.metrics["test"], indent=1))
    system.save(args.out)
    print(f"saved {args.kind} to {args.out}")


def cmd_evaluate(args):
    from engine.pipeline import Features, evaluate, load_system

    features = Features.load(args.features)
    split = _splits(features, _manifest_for(args), args.seed)
    rows = split[args.split] if args.split != "all" else list(range(len(features)))
    print(json.dumps(evaluate(load_system(args.model), features.subset(rows)), indent=1))


def cmd_baselines(args):
    from engine.pipeline import Features, evaluate, train_system

    features = Features.load(args.features)
    split = _splits(features, _manifest_for(args), args.seed)
    train, val, test = (features.subset(split[s]) for s in ("train", "val", "test"))
    print(
        f"{'method':8s} {'V2M R@1':>8s} {'R@10':>6s} {'R@25':>6s} {'M2V R@1':>8s} {'R@10':>6s} {'R@25':>6s}"
    )
    kinds = args.kinds.split(",")
    for kind in kinds:
        config = {"n_components": args.n_components} if kind != "vmnet" else {"seed": args.seed}
        result = evaluate(train_system(kind, train, val, config), test)
        cells = [100 * result[d][f"R@{k}"] for d in ("V2M", "M2V") for k in (1, 10, 25)]
        print(
            f"{kind:8s} "
            + " ".join(f"{c:8.1f}" if i % 3 == 0 else f"{c:6.1f}" for i, c in enumerate(cells))
        )
    chance = [100 * result["chance"][f"R@{k}"] for k in (1, 10, 25)]
    print(
        f"{'chance':8s} {chance[0]:8.1f} {chance[1]:6.1f} {chance[2]:6.1f} {chance[0]:8.1f} {chance[1]:6.1f} {chance[2]:6.1f}"
    )


def cmd_search(args):
    from engine.pipeline import Features, load_system
    from engine.search import top_k

    features = Features.load(args.features)
    system = load_system(args.model)
    video_emb, music_emb = system.embed(features.frames, features.music)
    queries, items = (video_emb, music_emb) if args.direction == "v2m" else (music_emb, video_emb)
    if unknown := [q for q in args.query or () if q not in features.keys]:
        raise ValueError(
            f"no item {unknown[0]!r} in {args.features} (keys as `extract` wrote them)"
        )
    rows = [features.keys.index(q) for q in args.query] if args.query else range(len(features))
    idx, scores = top_k(queries[list(rows)], items, args.k)
    for row, hits, sc in zip(rows, idx, scores, strict=True):
        found = ", ".join(f"{features.keys[j]} ({s:.3f})" for j, s in zip(hits, sc, strict=True))
        print(f"{features.keys[row]} -> {found}")


def cmd_embed(args):
    from engine.files import embeddings_npz, written_whole
    from engine.pipeline import Features, load_system

    features = Features.load(args.features)
    video, music = load_system(args.model).embed(features.frames, features.music)
    keys = [str(Path(key).with_suffix("")) for key in features.keys]  # as the platform names pairs
    if twice := [key for key, n in Counter(keys).items() if n > 1]:
        raise ValueError(f"files differ only by their suffix: {twice[:3]}")
    with written_whole(args.out) as f:
        f.write(embeddings_npz(keys, video, music))
    print(
        f"embedded {len(keys)} pairs -> {args.out} (into a study: "
        f"`python manage.py import_results COLLECTION SYSTEM {args.out}`)"
    )


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help; where it is None the help says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m engine", description="VM-NET video-music retrieval engine"
    )
    sub = p.add_subparsers(dest="command", required=True)
    parser = functools.partial(sub.add_parser, formatter_class=_Defaults)

    s = parser("demo-corpus", help="write a synthetic corpus of short music videos (MP4)")
    s.add_argument("out", help="output folder")
    s.add_argument("--n", type=int, default=400, help="number of clips")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--duration", type=float, default=10.0, help="seconds per clip")
    s.add_argument("--workers", type=_positive, default=None, help="processes (default: all cores)")
    s.set_defaults(func=cmd_demo_corpus)

    s = parser(
        "extract",
        help="extract frame and music features of every video in a folder",
        description="Extract frame and music features of every video in a folder. What is "
        "extracted is saved in OUT.partial every 10 minutes and when the run is stopped "
        "(Ctrl-C, SIGTERM); the same command then goes on from there.",
    )
    s.add_argument("folder")
    s.add_argument("--out", default="features.npz", help="output file (.npz)")
    s.add_argument(
        "--encoder",
        default="efficientnet-lite0",
        choices=["efficientnet-lite0", "inception-v3"],
        help="frame CNN: efficientnet-lite0 (1280-d, weights shipped) or the paper's "
        "inception-v3 (2048-d, weights downloaded once)",
    )
    s.add_argument(
        "--image-size", type=int, default=None, help="CNN input size (default: the encoder's)"
    )
    s.add_argument(
        "--random-weights", action="store_true", help="untrained CNN (no weights download)"
    )
    s.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    s.add_argument("--workers", type=_positive, default=None, help="processes (default: all cores)")
    s.set_defaults(func=cmd_extract)

    def data_args(s):
        s.add_argument("features", help=".npz written by `extract`")
        s.add_argument(
            "--manifest",
            default=None,
            help="CSV with video,split columns (default: manifest.csv beside the features, else a seeded 75/12.5/12.5 split)",
        )
        s.add_argument("--seed", type=int, default=0, help="random seed (split, training)")

    s = parser("train", help="train VM-NET or a baseline; saves a checkpoint")
    data_args(s)
    s.add_argument(
        "--kind",
        default="vmnet",
        choices=["vmnet", "cca", "pca", "plssvd", "pls"],
        help="system to train",
    )
    s.add_argument("--out", default="model.pt", help="checkpoint file")
    s.add_argument(
        "--epochs", type=_positive, default=None, help="maximum epochs (vmnet; default 300)"
    )
    s.add_argument(
        "--config",
        default=None,
        help='JSON overrides, e.g. \'{"top_k": 100, "lambdas": [1,1,0.2,0.2]}\'',
    )
    s.set_defaults(func=cmd_train)

    s = parser("evaluate", help="Recall@1/10/25 of a checkpoint, both directions")
    s.add_argument("model")
    data_args(s)
    s.add_argument(
        "--split", default="test", choices=["train", "val", "test", "all"], help="pairs to rank"
    )
    s.set_defaults(func=cmd_evaluate)

    s = parser("baselines", help="compare VM-NET with PCA / PLSSVD / PLS / CCA on the test split")
    data_args(s)
    s.add_argument("--kinds", default="pca,plssvd,pls,cca,vmnet", help="systems, comma-separated")
    s.add_argument("--n-components", type=_positive, default=64, help="dimensions of the baselines")
    s.set_defaults(func=cmd_baselines)

    s = parser(
        "embed",
        help="every pair's embeddings, as the platform's import_results takes them",
        description="Write the video and music embeddings of every pair as an .npz (keys, "
        "video, music) named by the platform's pair keys (a file's path without its suffix), "
        "for `python manage.py import_results COLLECTION SYSTEM FILE`.",
    )
    s.add_argument("model")
    s.add_argument("features")
    s.add_argument("--out", default="embeddings.npz", help="output file (.npz)")
    s.set_defaults(func=cmd_embed)

    s = parser("search", help="nearest items of the other modality")
    s.add_argument("model")
    s.add_argument("features")
    s.add_argument(
        "--query", action="append", help="key of a query item (repeatable; default: all)"
    )
    s.add_argument(
        "--direction",
        default="v2m",
        choices=["v2m", "m2v"],
        help="v2m: music for each video; m2v: videos for each music",
    )
    s.add_argument("--k", type=_positive, default=5, help="results per query")
    s.set_defaults(func=cmd_search)

    args = p.parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)  # as a shell reports Ctrl-C; outputs are written whole or not at all
    except BrokenPipeError:  # `... | head` stopped reading: no traceback about it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (OSError, ValueError, KeyError) as error:  # bad input: a message, not a traceback
        sys.exit(f"python -m engine {args.command}: error: {error}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


if __name__ == "__main__":
    main()
