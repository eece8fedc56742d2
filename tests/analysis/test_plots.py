import io
import xml.etree.ElementTree as ET

import pytest
from matplotlib.patches import PathPatch

from analysis.plots import preference_boxplot

from .frames import exact_answers


def _spec(subjects, pair_types=("GR", "GS", "SR"), directions=("V2M", "M2V")):
    return {
        (s, p, d): ((3 * s + len(p) + len(d)) % 11, 10)
        for s in range(subjects)
        for p in pair_types
        for d in directions
    }


def _boxes(fig):
    return [p for p in fig.axes[0].patches if isinstance(p, PathPatch)]


@pytest.mark.parametrize(
    "suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")]
)
def test_writes_each_format_by_suffix(tmp_path, suffix, magic):
    path = tmp_path / f"fig7{suffix}"
    fig = preference_boxplot(exact_answers(_spec(5)), path)
    assert path.read_bytes().startswith(magic)
    assert path.stat().st_size > 1000
    assert len(_boxes(fig)) == 6
    again = tmp_path / f"again{suffix}"
    preference_boxplot(exact_answers(_spec(5)), again)
    assert again.read_bytes() == path.read_bytes()  # the same data, the same file


def test_boxes_labels_chance_line_and_outliers(tmp_path):
    spec = _spec(8)
    for s, k in enumerate([5, 6, 6, 7, 7, 7, 8, 8]):
        spec[(s, "GR", "V2M")] = (k, 10)
    spec[(99, "GR", "V2M")] = (0, 10)  # far below everyone else: an outlier
    fig = preference_boxplot(exact_answers(spec), tmp_path / "fig.svg")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "GR\nV2M\nn=9" and labels[1] == "GR\nM2V\nn=8"
    assert len(labels) == 6
    assert any(list(line.get_ydata()) == [50, 50] for line in ax.get_lines())
    fliers = [line for line in ax.get_lines() if line.get_marker() == "+" and len(line.get_ydata())]
    assert [list(f.get_ydata()) for f in fliers] == [[0.0]]
    assert ax.get_title() and ax.get_ylabel()


def test_svg_has_one_box_per_pair_type_and_direction_present(tmp_path):
    spec = _spec(4, pair_types=("GR", "SR"))
    spec.update(_spec(4, pair_types=("GS",), directions=("V2M",)))
    out = io.BytesIO()
    fig = preference_boxplot(exact_answers(spec), out, format="svg")
    assert len(_boxes(fig)) == 5
    root = ET.fromstring(out.getvalue())
    assert root.tag.endswith("svg")
    assert b"GS" in out.getvalue() or len(root) > 0


def test_multi_system_study_gets_a_box_per_comparison(tmp_path):
    spec = _spec(3, pair_types=("GR", "G-S1", "G-S2", "S1-S2"))
    fig = preference_boxplot(exact_answers(spec), tmp_path / "fig.png")
    assert len(_boxes(fig)) == 8


def test_no_answers_still_draws_a_figure(tmp_path):
    empty = exact_answers({(1, "GR", "V2M"): (1, 1)}).iloc[:0]
    fig = preference_boxplot(empty, tmp_path / "empty.png")
    assert len(_boxes(fig)) == 0
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match="png"):
        preference_boxplot(exact_answers(_spec(2)), tmp_path / "fig.jpg")
