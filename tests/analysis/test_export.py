import io
import json
import zipfile

import openpyxl
import pandas as pd
import pytest

from analysis.export import build_report, cells, render, zip_all

from .frames import exact_answers

SPEC = {
    (s, p, d): (k, 10)
    for s, base in enumerate([8, 6, 7])
    for p, shift in [("GR", 1), ("GS", -1), ("SR", 0)]
    for d in ["V2M", "M2V"]
    for k in [base + shift]
}
MACHINE = {(p, d): (8, 10) for p in ["GR", "GS", "SR"] for d in ["V2M", "M2V"]}


@pytest.fixture(scope="module")
def report():
    return build_report(exact_answers(SPEC, MACHINE), title="Known", n_resamples=200)


def test_table_has_human_rows_and_machine_gr_row(report):
    assert report.table.index.tolist() == [
        ("Human", "GR"),
        ("Human", "GS"),
        ("Human", "SR"),
        ("Machine", "GR"),
    ]
    assert report.table.loc[("Human", "GR")].tolist() == [80.0, 80.0, 80.0]
    assert report.table.loc[("Human", "GS")].tolist() == [60.0, 60.0, 60.0]
    assert report.table.loc[("Machine", "GR")].tolist() == [80.0, 80.0, 80.0]
    assert report.counts == {"subjects": 3, "answers": 180}


def test_csv_is_one_row_per_judge_pair_type_direction(report):
    table = pd.read_csv(io.StringIO(render(report, "csv")))
    assert len(table) == 4 * 3
    human = table[
        (table.judge == "Human") & (table.pair_type == "SR") & (table.direction == "Total")
    ]
    assert human.iloc[0]["percent"] == 70.0 and human.iloc[0]["n_answers"] == 60
    machine = table[table.judge == "Machine"]
    assert machine["binom_p"].isna().all()
    pd.testing.assert_frame_equal(table, cells(report).astype(table.dtypes.to_dict()))


def test_json_markdown_latex(report):
    payload = json.loads(render(report, "json"))
    assert payload["counts"] == {"subjects": 3, "answers": 180}
    assert payload["table"][3] == {
        "judge": "Machine",
        "pair_type": "GR",
        "V2M": 80.0,
        "M2V": 80.0,
        "Total": 80.0,
    }
    assert len(payload["statistics"]) == 9 and len(payload["subjects"]) == 18
    markdown = render(report, "markdown")
    rows = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| ")]
    assert [cell.strip() for cell in rows[0]] == ["judge", "pair_type", "V2M", "M2V", "Total"]
    assert [cell.strip() for cell in rows[2]] == ["Human", "GS", "60.00", "60.00", "60.00"]
    assert "wilcoxon_p" in markdown
    latex = render(report, "latex")
    assert latex.count("\\begin{tabular}") == 2
    assert "n\\_answers" in latex and "80.00" in latex


def test_xlsx_and_zip(report):
    book = openpyxl.load_workbook(io.BytesIO(render(report, "xlsx")))
    assert {"Table IV", "Statistics", "Subjects"} <= set(book.sheetnames)
    assert any(80.0 in row for row in book["Table IV"].iter_rows(values_only=True))
    archive = zipfile.ZipFile(io.BytesIO(zip_all(report)))
    names = set(archive.namelist())
    assert names == {
        "preference.md",
        "preference.csv",
        "preference.json",
        "preference.tex",
        "preference.xlsx",
        "preference.png",
        "preference.svg",
        "subjects.csv",
    }
    assert archive.read("preference.png").startswith(b"\x89PNG")
    assert all(archive.getinfo(name).file_size > 100 for name in names)


def test_unknown_format(report):
    with pytest.raises(ValueError, match="format"):
        render(report, "docx")


def test_mixed_fits_join_the_report_when_asked():
    report = build_report(exact_answers(SPEC, MACHINE), mixed=True, n_resamples=50)
    assert report.mixed["comparison"].tolist() == ["GR", "GS", "SR"]
    assert "Mixed-effects" in render(report, "markdown")
