"""Uploaded systems: ranked-results CSVs and embeddings, checked in full, imported whole or not
at all, from the command line and from the admin."""

import io
import pickle
import re
import zipfile

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command

from experiments.models import Pair, SearchResult, Split, Study, StudySystem, System
from experiments.subjects import create_subject
from experiments.uploads import Ranked, UploadError, import_results, ranked_recalls

from .factories import make_collection

pytestmark = pytest.mark.django_db

N = 6  # test pairs


@pytest.fixture
def collection():
    collection = make_collection(N + 1, name="uploads")
    # One pair outside the test split: a valid result, never needed as a query.
    Pair.objects.filter(collection=collection, key=f"clip{N:03d}").update(split=Split.TRAIN)
    return collection


def keys():
    return [f"clip{i:03d}" for i in range(N)]


def ranked_rows(prefixed=True, depth=3):
    """query_item,rank,result_item,score rows: query i's results are i+1, i+2, … (mod N)."""
    rows = []
    for source, target in (("video", "music"), ("music", "video")):
        for i, key in enumerate(keys()):
            for rank in range(1, depth + 1):
                result = keys()[(i + rank) % N]
                if prefixed:
                    rows.append([f"{source}:{key}", rank, f"{target}:{result}", 1 - rank / 10])
                else:
                    direction = "V2M" if source == "video" else "M2V"
                    rows.append([key, rank, result, 1 - rank / 10, direction])
    return rows


def csv_file(rows, header="query_item,rank,result_item,score", name="results.csv"):
    lines = [header, *(",".join(str(v) for v in row) for row in rows)]
    return SimpleUploadedFile(name, ("\n".join(lines) + "\n").encode())


def test_a_ranked_csv_becomes_a_ready_external_system(collection):
    system = import_results(collection, "mine", csv_file(ranked_rows()))
    assert (system.kind, system.status) == (System.Kind.EXTERNAL, System.Status.READY)
    assert system.source_file and not system.embeddings
    assert SearchResult.objects.filter(system=system).count() == 2 * N * 3
    first = SearchResult.objects.get(system=system, direction="M2V", query__key="clip005", rank=1)
    assert (first.result.key, first.score) == ("clip000", pytest.approx(0.9))
    # The ground truth is never among these results: Recall@10 is 0 both ways.
    assert system.metrics["test"] == {d: {"R@1": 0.0, "R@10": 0.0} for d in ("V2M", "M2V")}


def test_a_direction_column_lets_items_go_without_prefixes(collection):
    rows = ranked_rows(prefixed=False)
    rows[0][2] = "video:" + rows[0][2]  # a V2M result named as a video item
    header = "query_item,rank,result_item,score,direction"
    with pytest.raises(UploadError) as caught:
        import_results(collection, "mine", csv_file(rows, header))
    assert [str(e) for e in caught.value.errors] == [
        "row 2: wrong modality: a V2M result is a music item"
    ]
    rows[0][2] = rows[0][2].removeprefix("video:")
    system = import_results(collection, "mine", csv_file(rows, header))
    assert system.results.count() == 2 * N * 3


def replace(rows, index, column, value):
    rows = [list(row) for row in rows]
    rows[index][column] = value
    return rows


BAD_FILES = {
    "unknown item": (
        replace(ranked_rows(), 0, 2, "music:nosuch"),
        "row 2: unknown item 'nosuch': no ready pair of the collection has it",
    ),
    "wrong modality": (
        replace(ranked_rows(), 1, 2, "video:clip002"),
        "row 3: wrong modality: a video query needs results of the other modality",
    ),
    "no modality": (
        replace(ranked_rows(), 2, 0, "clip000"),
        "row 4: say each item's modality ('video:KEY' or 'music:KEY') or add a direction column",
    ),
    "duplicate rank": (
        replace(ranked_rows(), 1, 1, 1),
        "row 3: rank 1 for V2M query clip000 is taken (row 2)",
    ),
    "same result twice": (
        replace(ranked_rows(), 1, 2, "music:clip001"),
        "row 3: clip001 is ranked twice for V2M query clip000 (row 2)",
    ),
    "rank not a number": (
        replace(ranked_rows(), 3, 1, "first"),
        "row 5: rank 'first' is not a whole number",
    ),
    "rank zero": (replace(ranked_rows(), 3, 1, 0), "row 5: rank 0 is not between 1 and 32767"),
    "score not a number": (
        replace(ranked_rows(), 4, 3, "high"),
        "row 6: score 'high' is not a number",
    ),
    "missing queries": (
        [row for row in ranked_rows() if row[0] != "music:clip003"],
        "missing queries: 1 test pairs have no M2V results (clip003); every test query needs "
        "results in both directions",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_row_is_named_and_nothing_is_imported(collection, case):
    rows, expected = BAD_FILES[case]
    with pytest.raises(UploadError) as caught:
        import_results(collection, "mine", csv_file(rows))
    assert [str(e) for e in caught.value.errors] == [expected]
    assert not System.objects.exists() and not SearchResult.objects.exists()


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "the file is empty"),
        ("query_item,rank,result_item\n", "the file has a header but no results"),
        ("query,rank,result\nvideo:clip000,1,music:clip001\n", "row 1: wrong columns: missing"),
        ("query_item,rank,result_item,rank\n", "row 1: wrong columns: repeated ['rank']"),
        ("query_item,rank,result_item\nvideo:clip000,1\n", "row 2: 2 fields, the header has 3"),
        ("\xff\xfe", "not UTF-8 text"),
    ],
)
def test_empty_files_and_wrong_columns_are_refused(collection, content, expected):
    data = content.encode("latin-1") if content.startswith("\xff") else content.encode()
    with pytest.raises(UploadError) as caught:
        import_results(collection, "mine", SimpleUploadedFile("r.csv", data))
    assert str(caught.value.errors[0]).startswith(expected)
    assert not System.objects.exists()


def test_every_error_is_listed_at_once(collection):
    rows = replace(replace(ranked_rows(), 0, 1, "x"), 5, 2, "music:nosuch")
    with pytest.raises(UploadError) as caught:
        import_results(collection, "mine", csv_file(rows))
    rows_named = [e.row for e in caught.value.errors]
    # Rows 2 and 7, then the queries those broken rows would have answered (none: depth 3).
    assert rows_named == [2, 7]


def test_a_bad_reupload_leaves_the_system_as_it_was(collection):
    system = import_results(collection, "mine", csv_file(ranked_rows(depth=2)))
    before = list(system.results.values_list("direction", "query", "rank", "result", "score"))
    with pytest.raises(UploadError):
        import_results(collection, "mine", csv_file(replace(ranked_rows(), 0, 1, "x")))
    system.refresh_from_db()
    assert system.message == f"Uploaded csv: {2 * N * 2} search results"
    assert before == list(
        system.results.values_list("direction", "query", "rank", "result", "score")
    )
    # A good one replaces the results in full.
    import_results(collection, "mine", csv_file(ranked_rows(depth=3)))
    assert system.results.count() == 2 * N * 3


def test_engine_systems_and_systems_in_use_are_not_overwritten(collection):
    System.objects.create(collection=collection, name="vmnet")
    with pytest.raises(UploadError, match="not an uploaded system"):
        import_results(collection, "vmnet", csv_file(ranked_rows()))
    system = import_results(collection, "mine", csv_file(ranked_rows()))
    study = Study.objects.create(name="s", slug="s", collection=collection, per_type=1)
    StudySystem.objects.create(study=study, system=system, label="S")
    import_results(collection, "mine", csv_file(ranked_rows(depth=3)))  # a draft: replaced
    study.status = Study.Status.OPEN  # open, even before its first subject: fixed
    study.save()
    with pytest.raises(UploadError, match="in the fixed design of s"):
        import_results(collection, "mine", csv_file(ranked_rows(depth=2)))
    create_subject(study)
    with pytest.raises(UploadError, match="in the fixed design of s"):
        import_results(collection, "mine", csv_file(ranked_rows(depth=2)))
    assert system.results.count() == 2 * N * 3


def embeddings(n_extra=1, dim=8, seed=0):
    """Random vectors for the test pairs (and `n_extra` others), in a shuffled order."""
    rng = np.random.default_rng(seed)
    names = keys() + [f"clip{N + i:03d}" for i in range(n_extra)]
    order = rng.permutation(len(names))
    return (
        np.array(names)[order],
        rng.normal(size=(len(names), dim))[order],
        rng.normal(size=(len(names), dim)).astype(np.float32)[order],
    )


def npz_file(names, video, music, name="emb.npz", **extra):
    buffer = io.BytesIO()
    np.savez(buffer, **{"keys": names, "video": video, "music": music, **extra})
    return SimpleUploadedFile(name, buffer.getvalue())


def test_embeddings_give_the_exact_cosine_neighbours_among_test_pairs(collection):
    names, video, music = embeddings()
    system = import_results(collection, "emb", npz_file(names, video, music), k=4)
    row = {key: i for i, key in enumerate(names)}
    test = [row[key] for key in keys()]  # the pair outside the test split is left out
    unit = [m[test] / np.linalg.norm(m[test], axis=1, keepdims=True) for m in (video, music)]
    for direction, queries, items in (("V2M", *unit), ("M2V", *unit[::-1])):
        order = np.argsort(-(queries @ items.T), axis=1, kind="stable")
        ground_truth_rank = (order == np.arange(N)[:, None]).argmax(axis=1)
        assert system.metrics["test"][direction]["R@1"] == pytest.approx(
            np.mean(ground_truth_rank == 0)
        )
        assert system.metrics["test"][direction]["R@10"] == 1.0  # only 6 items
        expected = order[:, :4]
        stored = SearchResult.objects.filter(system=system, direction=direction)
        got = {}
        for query, result in stored.values_list("query__key", "result__key"):
            got.setdefault(query, []).append(result)
        assert got == {keys()[q]: [keys()[i] for i in expected[q]] for q in range(N)}
    with system.embeddings.open("rb") as f, np.load(f) as stored:
        assert list(stored["keys"]) == keys()
        assert np.allclose(np.linalg.norm(stored["music"], axis=1), 1.0)


def test_a_structured_npy_works_too(collection):
    names, video, music = embeddings(n_extra=0, dim=4)
    table = np.zeros(N, dtype=[("key", "U20"), ("video", "f4", (4,)), ("music", "f4", (4,))])
    table["key"], table["video"], table["music"] = names, video, music
    buffer = io.BytesIO()
    np.save(buffer, table)
    system = import_results(collection, "npy", SimpleUploadedFile("e.npy", buffer.getvalue()))
    assert system.results.filter(direction="M2V").count() == N * N


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda n, v, m: (np.array([*n[:-1], "nosuch"]), v, m), "unknown item 'nosuch'"),
        (lambda n, v, m: (n[1:], v[1:], m[1:]), "missing queries: no vectors for 1 test pairs"),
        (lambda n, v, m: (np.array([n[0], *n[:-1]]), v, m), "repeats item 0"),
        (lambda n, v, m: (n, v[:, :4], m), "widths 4 and 8"),
        (lambda n, v, m: (n, v[:-1], m), "video must be a numeric matrix with one row per key"),
        (
            lambda n, v, m: (n, np.where(np.arange(len(n))[:, None] == 2, np.nan, v), m),
            "not finite",
        ),
        (lambda n, v, m: (np.arange(len(n)), v, m), "keys must be a one-dimensional array"),
    ],
)
def test_bad_embeddings_are_refused_whole(collection, change, expected):
    names, video, music = change(*embeddings())
    with pytest.raises(UploadError) as caught:
        import_results(collection, "emb", npz_file(names, video, music))
    assert any(expected in str(e) for e in caught.value.errors), caught.value.errors
    assert not System.objects.exists()


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "empty"),
        (b"not numpy at all", "not a NumPy .npz or .npy file"),
        (None, "expected arrays keys, video and music; found ['keys', 'video']"),
    ],
)
def test_files_that_are_not_embeddings_are_refused(collection, data, expected):
    if data is None:
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.array(keys()), video=np.ones((N, 2)))
        data = buffer.getvalue()
    with pytest.raises(UploadError, match=re.escape(expected)) as caught:
        import_results(collection, "emb", SimpleUploadedFile("e.npz", data))
    assert "allow_pickle" not in str(caught.value)  # numpy's unsafe suggestion is not passed on


def test_embeddings_larger_than_the_collection_are_refused_before_they_unpack(collection):
    """A few compressed MB can declare gigabytes: the headers are read first."""
    names, video, music = embeddings()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as npz:
        for name, array in (("keys", names), ("music", music)):
            with npz.open(f"{name}.npy", "w") as f:
                np.save(f, array)
        with npz.open("video.npy", "w") as f:  # its header only: a million rows, no data
            header = {"descr": "<f4", "fortran_order": False, "shape": (1_000_000, 512)}
            np.lib.format.write_array_header_1_0(f, header)
    with pytest.raises(UploadError, match=r"video has shape \(1000000, 512\): more rows than"):
        import_results(collection, "bomb", SimpleUploadedFile("e.npz", buffer.getvalue()))
    assert not System.objects.exists()


@pytest.mark.parametrize(
    "name, descr, shape",
    [
        ("video", "<f4", (4, 10_000_000)),  # few rows, but each 40 MB wide
        ("video", "<f4", (4, 512, 100_000)),  # a third dimension
        ("keys", "<U500", (1_000_000,)),  # the keys are read too: 2 GB of them
    ],
)
def test_embeddings_too_wide_deep_or_with_too_many_keys_are_refused_unread(
    collection, name, descr, shape
):
    """Each array's header is checked (the keys' too), for its width and its dimensions as
    well as its rows: any of them can declare gigabytes in a few compressed bytes."""
    names, video, music = embeddings()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as npz:
        for other, array in (("keys", names), ("video", video), ("music", music)):
            if other != name:
                with npz.open(f"{other}.npy", "w") as f:
                    np.save(f, array)
        with npz.open(f"{name}.npy", "w") as f:  # its header only: no data
            header = {"descr": descr, "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
    shown = re.escape(str(shape))
    with pytest.raises(UploadError, match=rf"e\.npz: {name} has shape {shown}: more rows than"):
        import_results(collection, "bomb", SimpleUploadedFile("e.npz", buffer.getvalue()))
    assert not System.objects.exists()


def object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"key": "clip000"}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def object_npz() -> bytes:
    names, video, music = embeddings()
    buffer = io.BytesIO()
    np.savez(buffer, keys=names.astype(object), video=video, music=music)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, data",
    [
        ("e.npz", pickle.dumps({"keys": keys()})),
        ("e.npy", object_npy()),
        ("e.npz", object_npz()),
    ],
)
def test_pickled_data_is_refused_without_suggesting_to_unpickle_it(collection, name, data):
    with pytest.raises(UploadError) as caught:
        import_results(collection, "emb", SimpleUploadedFile(name, data))
    assert [str(e) for e in caught.value.errors] == [
        f"{name}: not a plain numeric .npy/.npz array (object/pickled data is refused for safety)"
    ]
    assert "allow_pickle" not in str(caught.value) and not System.objects.exists()


def other_collections_results():
    """Results for another collection: every item unknown, 30 rows."""
    return csv_file([[f"video:other{i}", 1, f"music:other{i}", 0.5] for i in range(30)])


def test_the_command_summarises_errors_of_one_kind(collection, tmp_path):
    wrong = tmp_path / "other.csv"
    wrong.write_bytes(other_collections_results().read())
    err = io.StringIO()
    with pytest.raises(CommandError, match=r"Nothing imported: 32 error\(s\) in"):
        call_command("import_results", "uploads", "x", str(wrong), stderr=err)
    lines = err.getvalue().splitlines()
    unknown = [line for line in lines if "unknown item" in line]
    assert unknown[:10] == [
        f"row {i + 2}: unknown item 'other{i}': no ready pair of the collection has it"
        for i in range(10)
    ]
    assert unknown[10] == (
        "… and 20 more errors of this kind (unknown item …: no ready pair of the collection has it)"
    )
    assert len(lines) == 13 and sum("missing queries" in line for line in lines) == 2


def test_the_command_blames_the_name_not_the_file(collection, tmp_path):
    System.objects.create(collection=collection, name="VM-NET")
    good = tmp_path / "x.csv"
    good.write_bytes(csv_file(ranked_rows()).read())
    err = io.StringIO()
    with pytest.raises(CommandError) as refused:
        call_command("import_results", "uploads", "VM-NET", str(good), stderr=err)
    assert str(refused.value) == (
        "Nothing imported: the name 'VM-NET' belongs to a VM-NET system trained here, not an "
        "uploaded system: choose another name."
    )
    assert "x.csv" not in str(refused.value) and err.getvalue() == ""
    assert list(System.objects.values_list("name", flat=True)) == ["VM-NET"]


def test_the_command_imports_or_lists_every_error(collection, tmp_path):
    good = tmp_path / "good.csv"
    good.write_bytes(csv_file(ranked_rows()).read())
    out = io.StringIO()
    call_command("import_results", "uploads", "theirs", str(good), stdout=out)
    assert "theirs (uploaded results) of uploads: Uploaded csv: 36 search results" in out.getvalue()
    bad = tmp_path / "bad.txt"
    bad.write_bytes(csv_file(replace(ranked_rows(), 0, 2, "music:nosuch")).read())
    err = io.StringIO()
    with pytest.raises(CommandError, match=r"Nothing imported: 1 error\(s\)"):
        call_command("import_results", "uploads", "other", str(bad), "--kind", "csv", stderr=err)
    assert "row 2: unknown item 'nosuch'" in err.getvalue()
    with pytest.raises(CommandError, match="No collection named 'nope'"):
        call_command("import_results", "nope", "x", str(good))
    err = io.StringIO()
    with pytest.raises(CommandError, match="Nothing imported"):
        call_command("import_results", "uploads", "x", str(bad), stderr=err)
    assert "bad.txt: say the kind (csv or embeddings)" in err.getvalue()
    assert list(System.objects.values_list("name", flat=True)) == ["theirs"]


def test_the_admin_upload_page(admin_client, collection):
    url = "/admin/experiments/system/upload/"
    assert url in admin_client.get("/admin/experiments/system/").content.decode()
    bad = csv_file(replace(ranked_rows(), 3, 1, "first"))
    page = admin_client.post(
        url, {"collection": collection.pk, "name": "mine", "upload": bad, "k": 10}
    )
    html = page.content.decode()
    assert page.status_code == 200 and "Nothing was imported: 1 error." in html
    assert "row 5: rank &#x27;first&#x27; is not a whole number" in html
    page = admin_client.post(
        url,
        {
            "collection": collection.pk,
            "name": "mine",
            "upload": other_collections_results(),
            "k": 10,
        },
    )
    html = page.content.decode()
    assert "Nothing was imported: 32 errors." in html
    assert html.count("unknown item") == 11 and "row 12: unknown item" not in html
    assert "… and 20 more errors of this kind" in html
    assert not System.objects.exists()
    names, video, music = embeddings()
    good = npz_file(names, video, music)
    page = admin_client.post(
        url, {"collection": collection.pk, "name": "mine", "upload": good, "k": 3}
    )
    system = System.objects.get()
    assert page.status_code == 302 and page["Location"].endswith(f"/system/{system.pk}/change/")
    assert system.results.count() == 2 * N * 3 and system.embeddings
    change = admin_client.get(page["Location"]).content.decode()
    assert "Uploaded embeddings: 36 search results" in change and "emb.npz" in change


def test_recall_of_ranked_results_counts_their_ranks_not_their_places():
    ranked = [
        Ranked("V2M", "q1", 1, "x", None), Ranked("V2M", "q1", 50, "q1", None),  # a gap
        Ranked("V2M", "q2", 1, "y", None), Ranked("V2M", "q2", 2, "q2", None),
        Ranked("V2M", "q3", 1, "q3", None),
        Ranked("V2M", "q4", 1, "z", None),  # its own pair not listed at all
    ]  # fmt: skip
    assert ranked_recalls(ranked) == {"V2M": {"R@1": 0.25, "R@10": 0.5}}


def test_a_summary_of_errors_each_of_its_own_kind_stops_at_fifty_lines():
    error = UploadError([f"key{chr(65 + i % 26)}{chr(65 + i // 26)}: broken" for i in range(200)])
    lines = error.summary()
    assert len(lines) == 51 and lines[-1] == "… and 150 more errors"
    assert str(error).splitlines() == lines
