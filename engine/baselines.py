"""Linear baselines of Table III (scikit-learn): PCA, PLSSVD, PLS-canonical, CCA.

Each is fitted on the normalised video/music vectors and stored as one affine map per
modality (offset + matrix), read off the fitted scikit-learn transform, so a checkpoint
holds only arrays.
"""

from __future__ import annotations

import numpy as np
from sklearn.cross_decomposition import CCA, PLSSVD, PLSCanonical
from sklearn.decomposition import PCA
from sklearn.preprocessing import normalize

KINDS = ("pca", "plssvd", "pls", "cca")


def _affine(transform, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, matrix) with transform(x) == offset + x @ matrix, for an affine transform."""
    offset = transform(np.zeros((1, dim)))[0]
    matrix = transform(np.eye(dim)) - offset
    return offset, matrix


def fit_baseline(kind: str, video: np.ndarray, music: np.ndarray, n_components: int = 64) -> dict:
    """Fit `kind` on paired rows; returns {'video_offset', 'video_matrix', 'music_...'}."""
    n = min(n_components, video.shape[1], music.shape[1], len(video) - 1)
    dv, dm = video.shape[1], music.shape[1]
    if kind == "pca":  # no pairing at all: each modality's own principal axes
        pv, pm = PCA(n).fit(video), PCA(n).fit(music)
        v, m = _affine(pv.transform, dv), _affine(pm.transform, dm)
    elif kind in ("plssvd", "pls", "cca"):
        cls = {"plssvd": PLSSVD, "pls": PLSCanonical, "cca": CCA}[kind]
        est = cls(n_components=n, scale=True)
        if kind != "plssvd":
            est.set_params(max_iter=1000)
        est.fit(video, music)
        v = _affine(lambda x: est.transform(x), dv)
        m = _affine(lambda y: est.transform(np.zeros((len(y), dv)), y)[1], dm)
    else:
        raise ValueError(f"unknown baseline {kind!r}; choose from {KINDS}")
    return {"video_offset": v[0], "video_matrix": v[1], "music_offset": m[0], "music_matrix": m[1]}


def project(params: dict, modality: str, x: np.ndarray) -> np.ndarray:
    """Rows of `x` in the baseline's shared space, L2-normalised."""
    z = params[f"{modality}_offset"] + np.asarray(x, np.float64) @ params[f"{modality}_matrix"]
    return normalize(z).astype(np.float32)
