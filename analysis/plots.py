"""Fig. 7: the spread of per-subject preferences, one box per pair type and direction.

Drawn on a bare matplotlib Figure with the Agg canvas (no pyplot state), so it is safe in web
requests and worker processes. Styled as the paper's: blue quartile boxes, red medians, dotted
black whiskers to the furthest subject within 1.5 IQR of the box (Tukey's rule, stated on
the figure), red crosses for the subjects beyond, a green line at the 50% chance level.
"""

from pathlib import Path

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .preference import DIRECTIONS, ordered_pair_types, subject_preferences

FORMATS = {"png", "svg", "pdf"}
WHISKER_IQR = 1.5


def preference_figure(df, title="Per-subject preference (Fig. 7)", subjects=None) -> Figure:
    """The box plot as a Figure; boxes left to right: each pair type's V2M, then M2V.
    `subjects`: `subject_preferences(df)` when already made."""
    if subjects is None:
        subjects = subject_preferences(df)
    pair_types = ordered_pair_types(subjects["pair_type"].unique())
    boxes, labels, positions = [], [], []
    for i, pair_type in enumerate(pair_types):
        for j, direction in enumerate(DIRECTIONS):
            cell = subjects[
                (subjects["pair_type"] == pair_type) & (subjects["direction"] == direction)
            ]
            if cell.empty:
                continue  # nothing to draw; the table shows the empty cell
            boxes.append(cell["preference"].to_numpy())
            labels.append(f"{pair_type}\n{direction}\nn={len(cell)}")
            positions.append(i * 3 + j)
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(boxes)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axhline(50, color="green", linewidth=1.2, label="chance (50%)", zorder=1)
    if boxes:
        ax.boxplot(
            boxes,
            positions=positions,
            widths=0.7,
            whis=WHISKER_IQR,
            tick_labels=labels,
            patch_artist=True,
            boxprops={"facecolor": "none", "edgecolor": "blue"},
            medianprops={"color": "red", "linewidth": 1.5},
            whiskerprops={"color": "black", "linestyle": ":"},
            capprops={"color": "black"},
            flierprops={"marker": "+", "markeredgecolor": "red", "markersize": 8},
        )
    else:
        ax.text(0.5, 0.5, "no answers yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    ax.set_ylim(-3, 103)
    ax.set_ylabel("preference for the first-named item (%)")
    ax.set_xlabel(f"pair type, direction, subjects per box; whiskers: {WHISKER_IQR} IQR")
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize="small")
    return fig


def preference_boxplot(
    df, path, title="Per-subject preference (Fig. 7)", format=None, subjects=None
) -> Figure:
    """Write Fig. 7 to `path` (PNG, SVG or PDF by suffix, or `format` for a binary file object)
    and return the Figure. `subjects`: `subject_preferences(df)` when already made."""
    fmt = (format or Path(str(path)).suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"plot format must be one of {sorted(FORMATS)}, not {fmt!r}")
    fig = preference_figure(df, title, subjects)
    # SVG element ids are random unless salted: with a salt the same data gives the same file.
    with rc_context({"svg.hashsalt": "fig7"}):
        fig.savefig(path, format=fmt, dpi=150, metadata=_metadata(fmt))
    return fig


def _metadata(fmt):
    # No creation date: the same data gives the same file.
    return {"svg": {"Date": None}, "pdf": {"CreationDate": None}, "png": {}}[fmt]
