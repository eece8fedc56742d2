"""Results a researcher brings: an uploaded retrieval system (System of kind 'external').

Two kinds of file, checked in full before anything is written, and imported in one
transaction, so that a bad file leaves no half-imported system behind:

- **csv**: ranked results, a header and one row per result:
  `query_item,rank,result_item[,score][,direction]`.
  Items are pair keys of the collection with their modality in front, `video:KEY` or
  `music:KEY`, so a row says its direction itself (a video query with music results is V2M).
  With a `direction` column (V2M or M2V) the prefixes may be left out; where given, they must
  agree with it. Ranks are whole numbers from 1 (the best), unique per query and direction;
  gaps are allowed. Every ready test pair needs results as a query in both directions; results
  may be any ready pair of the collection.
- **embeddings**: the items' vectors, from which the platform computes the neighbours with the
  engine's search (cosine similarity, top `k` among the test pairs, as for its own systems).
  An `.npz` with arrays `keys` (pair keys), `video` and `music` (one row per key, the same
  width), or an `.npy` structured array with fields `key`, `video`, `music`. Rows of pairs
  outside the test split are accepted and left out. The test pairs' vectors are stored as the
  system's embeddings, so its machine judge answers by distance, as for the engine's systems.
  (Parquet is not read: pyarrow is not a dependency; `np.savez` writes the format above.)

Errors name the CSV row (the header is row 1, as a spreadsheet numbers it), or the item's
index in the arrays, and the reason.
"""

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.core.files.base import ContentFile
from django.db import transaction
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse

from engine.files import embeddings_npz
from experiments.models import (
    Collection,
    Direction,
    Pair,
    SearchResult,
    Split,
    System,
    locking_studies,
)

KINDS = ("csv", "embeddings")
SUFFIX_KINDS = {".csv": "csv", ".npz": "embeddings", ".npy": "embeddings"}
REQUIRED_COLUMNS = ("query_item", "rank", "result_item")
OPTIONAL_COLUMNS = ("score", "direction")
MODALITIES = {Direction.V2M: ("video", "music"), Direction.M2V: ("music", "video")}
MAX_RANK = 32767  # SearchResult.rank is a small integer
SHOWN_PER_KIND = 10
MAX_LINES = 50  # of an error summary
NOT_PLAIN = "not a plain numeric .npy/.npz array (object/pickled data is refused for safety)"
DEFAULT_K = 10


@dataclass(frozen=True)
class RowError:
    row: int | None  # CSV row (header = 1) or array index; None: the file as a whole
    message: str

    def __str__(self):
        return self.message if self.row is None else f"row {self.row}: {self.message}"


class UploadError(ValueError):
    """The file cannot be imported; `errors` says where and why. Nothing was written.
    `in_file` is False where the file is not at fault (the system's name, the collection)."""

    def __init__(self, errors: Iterable[RowError | str], in_file: bool = True):
        self.errors = [e if isinstance(e, RowError) else RowError(None, e) for e in errors]
        self.in_file = in_file
        super().__init__("\n".join(self.summary()))

    def summary(self, shown: int = SHOWN_PER_KIND) -> list[str]:
        """The errors' lines, at most `shown` of each kind (messages alike but for their
        quoted values and numbers); after the last shown of a kind, how many more of it
        there are. A file wrong in one way (another collection's keys) is wrong on every row."""
        kinds = [re.sub(r"'[^']*'|\b\d+\b", "…", error.message) for error in self.errors]
        totals, seen, lines = Counter(kinds), Counter(), []
        for error, kind in zip(self.errors, kinds, strict=True):
            if len(lines) >= MAX_LINES:  # kinds that name keys unquoted are each their own
                told = sum(totals[k] if n >= shown else n for k, n in seen.items())
                lines.append(f"… and {len(self.errors) - told} more errors")
                break
            seen[kind] += 1
            if seen[kind] <= shown:
                lines.append(str(error))
            if seen[kind] == shown < totals[kind]:
                lines.append(f"… and {totals[kind] - shown} more errors of this kind ({kind})")
        return lines


@dataclass(frozen=True)
class Ranked:
    direction: str
    query: str  # pair keys
    rank: int
    result: str
    score: float | None


def import_results(
    collection: Collection, name: str, upload, kind: str | None = None, k: int = DEFAULT_K
) -> System:
    """Create (or replace the results of) the external system `name` of `collection` from
    `upload` (a path or a file object with a name). `kind` is 'csv' or 'embeddings' (default:
    from the file's suffix). Raises UploadError, with nothing written, when the file is bad."""
    filename, data = _read(upload)
    kind = kind or SUFFIX_KINDS.get(Path(filename).suffix.lower())
    if kind not in KINDS:
        raise UploadError([f"{filename}: say the kind (csv or embeddings): not .csv, .npz or .npy"])
    pairs = dict(
        Pair.objects.filter(collection=collection, status=Pair.Status.READY).values_list(
            "key", "split"
        )
    )
    test_keys = sorted(key for key, split in pairs.items() if split == Split.TEST)
    if not test_keys:
        raise UploadError(
            [f"{collection} has no ready test pairs to hold results for"], in_file=False
        )
    embeddings = None
    if kind == "csv":
        ranked = read_ranked_csv(data, set(pairs), test_keys)
        metrics = ranked_recalls(ranked)
    else:
        from engine.metrics import recalls

        keys, video, music = read_embeddings(data, filename, set(pairs), test_keys)
        embeddings = _test_embeddings(keys, video, music, test_keys)
        ranked = neighbours(*embeddings, k=k)
        metrics = recalls(*embeddings[1:])
    return _store(collection, name, kind, filename, data, ranked, embeddings, metrics)


# --- Reading and checking ------------------------------------------------------------------


def read_ranked_csv(data: bytes, known: set[str], test_keys: Iterable[str]) -> list[Ranked]:
    """The rows of a ranked-results CSV, checked (see the module's docstring)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UploadError([f"not UTF-8 text: {error}"]) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [column.strip().lower() for column in next(reader, [])]
    if not any(header):
        raise UploadError(["the file is empty: expected a header query_item,rank,result_item"])
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    repeated = sorted({c for c in header if header.count(c) > 1})
    problems = [
        f"{what} {columns}"
        for what, columns in (("missing", missing), ("unknown", unknown), ("repeated", repeated))
        if columns
    ]
    if problems:
        raise UploadError(
            [
                RowError(
                    1,
                    f"wrong columns: {'; '.join(problems)} (need query_item, rank, result_item; "
                    "may add score, direction)",
                )
            ]
        )
    errors, rows = [], []
    seen_rank, seen_result = {}, {}
    for number, fields in enumerate(reader, start=2):
        if not any(field.strip() for field in fields):
            continue  # blank line
        if len(fields) != len(header):
            errors.append(RowError(number, f"{len(fields)} fields, the header has {len(header)}"))
            continue
        row = dict(zip(header, (field.strip() for field in fields), strict=True))
        try:
            item = _ranked(row, known)
        except ValueError as error:
            errors.append(RowError(number, str(error)))
            continue
        where = f"for {item.direction} query {item.query}"
        rank_key = (item.direction, item.query, item.rank)
        result_key = (item.direction, item.query, item.result)
        if rank_key in seen_rank:
            errors.append(
                RowError(number, f"rank {item.rank} {where} is taken (row {seen_rank[rank_key]})")
            )
        elif result_key in seen_result:
            errors.append(
                RowError(
                    number,
                    f"{item.result} is ranked twice {where} (row {seen_result[result_key]})",
                )
            )
        else:
            seen_rank[rank_key], seen_result[result_key] = number, number
            rows.append(item)
    if not rows and not errors:
        errors.append(RowError(None, "the file has a header but no results"))
    answered = {(r.direction, r.query) for r in rows}
    errors += _missing_queries(test_keys, answered)
    if errors:
        raise UploadError(errors)
    return rows


def _ranked(row: dict, known: set[str]) -> Ranked:
    """One CSV row as a Ranked result; ValueError says what is wrong with it."""
    direction = row.get("direction", "").upper()
    if direction and direction not in MODALITIES:
        raise ValueError(f"direction {row['direction']!r} is neither V2M nor M2V")
    query_modality, query = _item(row["query_item"], "query_item")
    result_modality, result = _item(row["result_item"], "result_item")
    if direction:
        expected = MODALITIES[direction]
        for what, modality, want in (
            ("query", query_modality, expected[0]),
            ("result", result_modality, expected[1]),
        ):
            if modality not in (None, want):
                raise ValueError(f"wrong modality: a {direction} {what} is a {want} item")
    elif query_modality is None or result_modality is None:
        raise ValueError(
            "say each item's modality ('video:KEY' or 'music:KEY') or add a direction column"
        )
    elif query_modality == result_modality:
        raise ValueError(
            f"wrong modality: a {query_modality} query needs results of the other modality"
        )
    else:
        direction = Direction.V2M if query_modality == "video" else Direction.M2V
    unknown = [key for key in (query, result) if key not in known]
    if unknown:
        raise ValueError(f"unknown item {unknown[0]!r}: no ready pair of the collection has it")
    try:
        rank = int(row["rank"])
    except ValueError:
        raise ValueError(f"rank {row['rank']!r} is not a whole number") from None
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank {rank} is not between 1 and {MAX_RANK}")
    score = None
    if row.get("score"):
        try:
            score = float(row["score"])
        except ValueError:
            raise ValueError(f"score {row['score']!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"score {row['score']!r} is not a finite number")
    return Ranked(str(direction), query, rank, result, score)


def _item(value: str, column: str) -> tuple[str | None, str]:
    """'video:KEY' → ('video', 'KEY'); a bare key → (None, key)."""
    modality, sep, key = value.partition(":")
    if sep and modality.lower() in ("video", "music"):
        modality, value = modality.lower(), key.strip()
    else:
        modality = None
    if not value:
        raise ValueError(f"{column} is empty")
    return modality, value


def _missing_queries(test_keys, answered) -> list[RowError]:
    errors = []
    for direction in MODALITIES:
        missing = [key for key in test_keys if (direction, key) not in answered]
        if missing:
            shown = ", ".join(missing[:10]) + (", …" if len(missing) > 10 else "")
            errors.append(
                RowError(
                    None,
                    f"missing queries: {len(missing)} test pairs have no {direction} results "
                    f"({shown}); every test query needs results in both directions",
                )
            )
    return errors


MAX_WIDTH = 16384  # of an embedding: wider is no retrieval system's


def _check_sizes(loaded, filename: str, n_pairs: int) -> None:
    """Refuse, from their headers, arrays larger than the collection's embeddings can be:
    compressed, a few MB can unpack to gigabytes (an audit's 4 MB file took 4.2 GB)."""
    for name in ("keys", "video", "music"):
        if name not in loaded.files:
            continue
        with loaded.zip.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape = read(f)[0]
        rows, width = (shape + (1, 1))[:2] if shape else (1, 1)
        if rows > n_pairs or width > MAX_WIDTH or len(shape) > 2:
            raise UploadError(
                [f"{filename}: {name} has shape {shape}: more rows than the collection's "
                 f"{n_pairs} pairs, or wider than {MAX_WIDTH}"]
            )  # fmt: skip


def read_embeddings(data: bytes, filename: str, known: set[str], test_keys: Iterable[str]):
    """(keys, video, music) from an .npz or a structured .npy, checked; UploadError if bad."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        # numpy takes any other file for a pickle, and suggests the unsafe allow_pickle
        if not data:
            problem = f"empty ({error})"
        elif "pickle" not in str(error):
            problem = f"not a NumPy .npz or .npy file ({error})"
        elif data.startswith((b"\x93NUMPY", b"\x80")):  # object arrays, or a pickle
            problem = NOT_PLAIN
        else:
            problem = "not a NumPy .npz or .npy file"
        raise UploadError([f"{filename}: {problem}"]) from None
    if isinstance(loaded, np.ndarray):  # .npy: a structured array
        fields = loaded.dtype.names or ()
        arrays = {
            name: loaded[field]
            for name, field in (("keys", "key"), ("video", "video"), ("music", "music"))
            if field in fields
        }
        wanted = "a structured array with fields key, video, music"
    else:
        try:
            with loaded:
                _check_sizes(loaded, filename, len(known))
                arrays = {n: loaded[n] for n in ("keys", "video", "music") if n in loaded}
        except ValueError as error:  # object arrays need pickle, which is not allowed
            problem = NOT_PLAIN if "pickle" in str(error) else str(error)
            raise UploadError([f"{filename}: {problem}"]) from None
        wanted = "arrays keys, video and music"
    if len(arrays) < 3:
        raise UploadError([f"{filename}: expected {wanted}; found {sorted(arrays)}"])
    keys, video, music = arrays["keys"], arrays["video"], arrays["music"]
    if keys.ndim != 1 or keys.dtype.kind not in "US":
        raise UploadError(["keys must be a one-dimensional array of strings (pair keys)"])
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in keys.tolist()]
    errors = []
    for name, matrix in (("video", video), ("music", music)):
        if matrix.ndim != 2 or matrix.dtype.kind not in "fiu" or len(matrix) != len(keys):
            errors.append(
                RowError(
                    None,
                    f"{name} must be a numeric matrix with one row per key "
                    f"({len(keys)}), not {matrix.dtype} of shape {matrix.shape}",
                )
            )
    if errors:
        raise UploadError(errors)
    if video.shape[1] != music.shape[1]:
        raise UploadError(
            [
                f"video and music vectors must share one space: widths {video.shape[1]} and "
                f"{music.shape[1]}"
            ]
        )
    first = {}
    for i, key in enumerate(keys):
        if key in first:
            errors.append(RowError(i, f"key {key!r} repeats item {first[key]}"))
            continue
        first[key] = i
        if key not in known:
            errors.append(RowError(i, f"unknown item {key!r}: no ready pair of the collection"))
        for name, matrix in (("video", video), ("music", music)):
            row = matrix[i].astype(np.float64)
            if not np.isfinite(row).all() or not row.any():
                errors.append(RowError(i, f"{key}: the {name} vector is zero or not finite"))
    missing = [key for key in test_keys if key not in first]
    if missing:
        shown = ", ".join(missing[:10]) + (", …" if len(missing) > 10 else "")
        errors.append(
            RowError(None, f"missing queries: no vectors for {len(missing)} test pairs ({shown})")
        )
    if errors:
        raise UploadError(errors)
    return keys, video, music


def _test_embeddings(keys, video, music, test_keys):
    """The test pairs' rows, in `test_keys` order, L2-normalised (float32)."""
    row = {key: i for i, key in enumerate(keys)}
    take = [row[key] for key in test_keys]

    from sklearn.preprocessing import normalize

    def unit(x):
        return normalize(np.asarray(x, dtype=np.float32)[take])

    return list(test_keys), unit(video), unit(music)


def neighbours(keys, video, music, k: int = DEFAULT_K) -> list[Ranked]:
    """Each item's top-k items of the other modality (cosine), both directions."""
    from engine.search import top_k

    rows = []
    for direction, queries, items in (
        (Direction.V2M, video, music),
        (Direction.M2V, music, video),
    ):
        indices, scores = top_k(queries, items, min(k, len(keys)))
        rows += [
            Ranked(str(direction), keys[q], rank, keys[i], float(score))
            for q in range(len(keys))
            for rank, (i, score) in enumerate(zip(indices[q], scores[q], strict=True), start=1)
        ]
    return rows


# --- Writing ---------------------------------------------------------------------------------


def replace_search_results(system: System, ranked: Iterable[Ranked]) -> None:
    """Store `ranked` (pair keys of the system's collection) as the system's only results."""
    ids = dict(Pair.objects.filter(collection_id=system.collection_id).values_list("key", "pk"))
    with transaction.atomic():
        SearchResult.objects.filter(system=system).delete()
        SearchResult.objects.bulk_create(
            (
                SearchResult(
                    system=system,
                    direction=r.direction,
                    query_id=ids[r.query],
                    rank=r.rank,
                    result_id=ids[r.result],
                    score=r.score,
                )
                for r in ranked
            ),
            batch_size=2000,
        )


def _read(upload) -> tuple[str, bytes]:
    if isinstance(upload, str | Path):
        path = Path(upload)
        try:
            return path.name, path.read_bytes()
        except OSError as error:
            raise UploadError([f"cannot read {path}: {error.strerror}"]) from None
    upload.seek(0)
    return Path(upload.name or "upload").name, upload.read()


def _store(collection, name, kind, filename, data, ranked, embeddings, metrics) -> System:
    name = name.strip()
    if not name or len(name) > System._meta.get_field("name").max_length:
        raise UploadError(["the system needs a name of at most 100 characters"], in_file=False)
    written = []
    try:
        with transaction.atomic():
            system = (
                System.objects.select_for_update().filter(collection=collection, name=name).first()
            )
            if system is None:
                system = System(collection=collection, name=name, kind=System.Kind.EXTERNAL)
            elif system.kind != System.Kind.EXTERNAL:
                raise UploadError(
                    [
                        f"the name {name!r} belongs to a {system.get_kind_display()} system "
                        "trained here, not an uploaded system: choose another name"
                    ],
                    in_file=False,
                )
            elif studies := locking_studies(system):
                raise UploadError(
                    [
                        f"{name} is in the fixed design of {', '.join(map(str, studies))} "
                        "(prepared for good, or with subjects): upload under a new name"
                    ],
                    in_file=False,
                )
            old = [f.name for f in (system.source_file, system.embeddings) if f]
            system.source_file.save(filename, ContentFile(data), save=False)
            written.append(system.source_file.name)
            if embeddings is not None:
                system.embeddings.save(
                    f"{Path(filename).stem}-embeddings.npz",
                    ContentFile(embeddings_npz(*embeddings)),
                    save=False,
                )
                written.append(system.embeddings.name)
            else:
                system.embeddings = ""  # a CSV system judges by its ranking
            system.kind = System.Kind.EXTERNAL
            system.config = {**system.config, "upload": {"kind": kind, "file": filename}}
            system.metrics = {"test": metrics}
            system.status, system.progress = System.Status.READY, 1.0
            system.message = f"Uploaded {kind}: {len(ranked)} search results"
            system.save()
            replace_search_results(system, ranked)
            storage = system.source_file.storage
            transaction.on_commit(lambda: [storage.delete(n) for n in old if n not in written])
    except Exception:
        for written_name in written:
            system.source_file.storage.delete(written_name)
        raise
    return system


def ranked_recalls(ranked: list[Ranked], ks=(1, 10)) -> dict:
    """Recall@K per direction from ranked results: the share of queries whose own pair is
    ranked K or better ({'V2M': {'R@1': …}, …}, as engine evaluate() gives). Ranks are the
    uploaded ones: with gaps, a pair at rank 50 is not among the 10 best."""
    out = {}
    for direction in MODALITIES:
        own_rank = {}  # query → the rank of its own pair (absent: not in its list)
        for r in ranked:
            if r.direction == direction:
                own_rank.setdefault(r.query, None)
                if r.result == r.query:
                    own_rank[r.query] = r.rank
        if own_rank:
            out[str(direction)] = {
                f"R@{k}": float(
                    np.mean([rank is not None and rank <= k for rank in own_rank.values()])
                )
                for k in ks
            }
    return out


# --- The admin's upload page (hooked in by SystemAdmin.get_urls) -----------------------------


class ResultsUploadForm(forms.Form):
    collection = forms.ModelChoiceField(Collection.objects.order_by("name"))
    name = forms.CharField(
        max_length=100, help_text="The system's name; an uploaded system of that name is replaced."
    )
    upload = forms.FileField(
        label="File",
        help_text="Ranked results (.csv: query_item,rank,result_item[,score][,direction], "
        "items as video:KEY or music:KEY) or embeddings (.npz with keys, video, music).",
    )
    kind = forms.ChoiceField(
        choices=[("", "from the file's suffix"), *((k, k) for k in KINDS)], required=False
    )
    k = forms.IntegerField(
        min_value=1, max_value=1000, initial=DEFAULT_K, help_text="Neighbours kept (embeddings)"
    )

    def clean_upload(self):
        upload = self.cleaned_data["upload"]
        if upload.size > settings.ADMIN_UPLOAD_MAX_BYTES:
            raise forms.ValidationError(
                f"Larger than {settings.ADMIN_UPLOAD_MAX_BYTES // 2**20} MiB: use "
                "`manage.py import_results`."
            )
        return upload


@staff_member_required
def upload_view(request):
    """Upload a system's results; a bad file is listed row by row and nothing is imported."""
    if not request.user.has_perm("experiments.add_system"):
        raise PermissionDenied
    form = ResultsUploadForm(request.POST or None, request.FILES or None)
    errors, lines = [], []
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            system = import_results(
                data["collection"], data["name"], data["upload"], data["kind"] or None, data["k"]
            )
        except UploadError as error:
            errors = error.errors
            lines = error.summary()
        else:
            messages.success(request, f"{system}: {system.message}.")
            return HttpResponseRedirect(
                reverse("admin:experiments_system_change", args=[system.pk])
            )
    context = {
        **admin.site.each_context(request),
        "title": "Upload a system's results",
        "form": form,
        "errors": errors,
        "error_lines": lines,
        "opts": System._meta,
    }
    return TemplateResponse(request, "admin/experiments/system/upload.html", context)
