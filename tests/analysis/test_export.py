import io
import json
import zipfile

import openpyxl
import pandas as pd
import pytest

from analysis.export import build_report, cells, escape_latex, render, statistics_note, zip_all

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
    return build_report(exact_answers(SPEC, MACHINE), title="Known")


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
    assert report.counts == {"subjects": 3, "answers": 180, "answers_with_media_errors": 0}


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
    assert payload["counts"] == {"subjects": 3, "answers": 180, "answers_with_media_errors": 0}
    assert payload["table"][3] == {
        "judge": "Machine",
        "pair_type": "GR",
        "V2M": 80.0,
        "M2V": 80.0,
        "Total": 80.0,
    }
    assert len(payload["statistics"]) == 9 and len(payload["subjects"]) == 18
    # Every number in full (rounded to 6 places, p = 1e-9 read 0.0), NaN as null.
    rows = report.statistics.reset_index().to_dict(orient="records")
    assert payload["statistics"] == [
        {key: None if pd.isna(value) else value for key, value in row.items()} for row in rows
    ]
    assert set(payload["subjects"][0]) == set(report.subjects.columns)  # no stray "index"
    markdown = render(report, "markdown")
    rows = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| ")]
    assert [cell.strip() for cell in rows[0]] == ["judge", "pair_type", "V2M", "M2V", "Total"]
    assert [cell.strip() for cell in rows[2]] == ["Human", "GS", "60.00", "60.00", "60.00"]
    assert "wilcoxon_p" in markdown
    assert "overstate the evidence" in markdown  # what the binomial test assumes
    assert "With 3 subjects no wilcoxon_p can be below 0.25." in markdown
    latex = render(report, "latex")
    assert latex.count("\\begin{tabular}") == 3  # Table IV, the machine's coverage, statistics
    assert "n\\_answers" in latex and "80.00" in latex
    assert "50\\%" in latex and "50%" not in latex.replace("50\\%", "")


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
    report = build_report(exact_answers(SPEC, MACHINE), mixed=True)
    assert report.mixed["comparison"].tolist() == ["GR", "GS", "SR"]
    assert "Mixed-effects" in render(report, "markdown")


def test_csv_counts_stay_integers_next_to_machine_rows(report):
    table = pd.read_csv(io.StringIO(render(report, "csv")), dtype=str, keep_default_na=False)
    human = table[
        (table.judge == "Human") & (table.pair_type == "SR") & (table.direction == "Total")
    ].iloc[0]
    assert (human["n_answers"], human["n_subjects"], human["preferred"]) == ("60", "3", "42")
    machine = table[table.judge == "Machine"].set_index("direction")
    assert machine["n_answers"].tolist() == ["30", "30", "60"]
    assert (machine["n_subjects"] == "").all() and (machine["binom_p"] == "").all()
    assert cells(report)["n_answers"].dtype == "Int64"


def _partly_judged():
    """The machine judges only the first G-R question of each subject's cell (6 of 60), and
    chooses G on each: 100% of 6 judged out of 60."""
    df = exact_answers(SPEC, MACHINE)
    unjudged = (df.pair_type == "GR") & ~df["item"].str.endswith("-0")
    df.loc[unjudged, "machine_S"] = None
    return build_report(df, title="Partly judged")


def test_machine_row_carries_how_many_questions_it_judged_in_every_format():
    report = _partly_judged()
    assert report.table.loc[("Machine", "GR")].tolist() == [100.0, 100.0, 100.0]

    table = pd.read_csv(io.StringIO(render(report, "csv")))
    machine = table[table.judge == "Machine"].set_index("direction")
    assert machine.loc["Total", ["percent", "preferred", "n_answers"]].tolist() == [100.0, 6, 6]
    assert machine.loc["Total", ["n_questions", "coverage"]].tolist() == [60, 10.0]
    assert machine.loc["V2M", ["n_answers", "n_questions", "coverage"]].tolist() == [3, 30, 10.0]
    human = table[(table.judge == "Human") & (table.pair_type == "GR")].set_index("direction")
    assert human.loc["Total", ["n_answers", "n_questions", "coverage"]].tolist() == [60, 60, 100]

    payload = json.loads(render(report, "json"))
    assert payload["machine"][2] == {
        "judge": "Machine",
        "direction": "Total",
        "percent": 100.0,
        "preferred": 6,
        "n_judged": 6,
        "n_questions": 60,
        "coverage": 10.0,
    }

    markdown = render(report, "markdown")
    assert "## Machine G-R: questions judged" in markdown
    rows = [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in markdown.splitlines()
        if line.startswith("| Machine ")
    ]
    assert ["Machine", "Total", "100.00", "6", "6", "60", "10.00"] in rows

    latex = render(report, "latex")
    assert latex.count("\\begin{tabular}") == 3 and "n\\_judged" in latex

    book = openpyxl.load_workbook(io.BytesIO(render(report, "xlsx")))
    sheet = list(book["Machine G-R"].iter_rows(values_only=True))
    assert sheet[0] == (
        "judge",
        "direction",
        "percent",
        "preferred",
        "n_judged",
        "n_questions",
        "coverage",
    )
    assert ("Machine", "Total", 100, 6, 6, 60, 10) in sheet


def test_holm_adjusted_p_values_in_every_format(report):
    table = pd.read_csv(io.StringIO(render(report, "csv")))
    columns = list(table.columns)
    assert columns.index("binom_p_holm") == columns.index("binom_p") + 1
    assert columns.index("wilcoxon_p_holm") == columns.index("wilcoxon_p") + 1
    human = table[table.judge == "Human"]
    assert (human["binom_p_holm"] >= human["binom_p"]).all()
    assert table.loc[table.judge == "Machine", "binom_p_holm"].isna().all()
    statistics = json.loads(render(report, "json"))["statistics"]
    assert all("binom_p_holm" in row and "wilcoxon_p_holm" in row for row in statistics)
    assert "binom_p_holm" in render(report, "markdown")
    assert "binom\\_p\\_holm" in render(report, "latex")
    book = openpyxl.load_workbook(io.BytesIO(render(report, "xlsx")))
    assert "wilcoxon_p_holm" in next(book["Statistics"].iter_rows(values_only=True))


def test_an_answer_with_two_media_errors_is_one_answer_with_media_errors():
    df = exact_answers(SPEC, MACHINE).assign(media_errors=0)
    df.loc[0, "media_errors"] = 2  # both candidates failed to load on one question
    report = build_report(df)
    assert report.counts["answers_with_media_errors"] == 1
    assert "1 answer was given while a medium could not be loaded" in render(report, "markdown")


def test_the_notes_reach_the_xlsx_and_the_latex_caption():
    df = exact_answers(SPEC, MACHINE)
    report = build_report(df, systems={"S1": "vmnet"}, left_out={"not_finished": 2})
    left_out = "Left out: 2 subjects yet to finish."
    book = openpyxl.load_workbook(io.BytesIO(render(report, "xlsx")))
    notes = [row[0] for row in book["Notes"].iter_rows(min_row=2, values_only=True)]
    assert notes == ["Systems: S1 = vmnet.", left_out, statistics_note(3)]
    caption = render(report, "latex").split("\\caption{", 1)[1].split("}\n", 1)[0]
    assert left_out in caption and "S1 = vmnet" in caption
    # Nobody left out, no media errors, no systems named: what the tests assume.
    book = openpyxl.load_workbook(io.BytesIO(render(build_report(df), "xlsx")))
    assert [row[0] for row in book["Notes"].iter_rows(min_row=2, values_only=True)] == [
        statistics_note(3)
    ]


def test_every_format_but_csv_says_which_test_to_claim_with_and_why():
    """The binomial test counts a subject's answers as independent: where subjects differ it
    calls a true 50% significant in a quarter of studies. Each format says so, and puts the
    tests that count subjects first."""
    report = build_report(exact_answers(SPEC, MACHINE), systems={"S1": "my_model 50%"})
    note = statistics_note(3)
    assert note.startswith("Claim a cell differs from 50% with wilcoxon_p_holm")
    assert note in render(report, "markdown")
    assert note in json.loads(render(report, "json"))["notes"]
    latex = render(report, "latex")
    assert escape_latex(note) in latex and "S1 = my\\_model 50\\%" in latex
    columns = list(pd.read_csv(io.StringIO(render(report, "csv"))).columns)
    assert columns.index("subject_ci_low") < columns.index("wilcoxon_p") < columns.index("binom_p")
