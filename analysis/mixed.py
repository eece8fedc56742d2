"""A mixed-effects logistic model of one comparison's answers.

    logit P(subject s prefers the first kind on item i) = β0 + u_s + v_i,
    u_s ~ N(0, σ_subject²), v_i ~ N(0, σ_item²)   (random intercepts, crossed)

fitted with statsmodels' `BinomialBayesMixedGLM.fit_vb` (variational Bayes, optimised with
L-BFGS-B: see `_fit_vb`). The reported preference is expit(β0): the chance that a typical
subject prefers the first kind on a typical item. Pooled shares (Table IV) are pulled towards
50% by subject and item spread; β0 is not.

The interval: fit_vb's mean-field posterior treats β0 as independent of the random
intercepts, which makes its sd of β0 far too small (in simulations its 95% interval held the
true β0 about half the time). We keep fit_vb's means and variance components, and take β0's sd
from the inverse of the full posterior precision (Laplace) at those means:
H = A'WA + diag(prior precisions), A = [fixed | random-effect design], W = p(1-p).
The interval is β0 ± z·sd. With few subjects a t quantile (subjects − 1 df) looks safer but
is not: in 200 simulations per size (tests/analysis/test_mixed.py's `simulate`, 20 answers
each, 40 items) the 95% interval held the true β0 in 93% of them with 3 subjects, 93.5% with
5, 96.5% with 10, 92% with 30; with t it held it in 99.5% (3) and 99% (5). Measured again
on `simulate(seed)` for seeds 0-199, with fit_vb's BFGS and with L-BFGS-B (the same intervals
in all 800): z held it in 89% (3), 91% (5), 93% (10), 94% (30); t in 100% (3), 96.5% (5).
"""

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.linalg import splu
from scipy.special import expit
from scipy.stats import norm
from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM
from statsmodels.tools.sm_exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from .preference import answers


@dataclass(frozen=True)
class PreferenceFit:
    comparison: str
    direction: str  # 'V2M', 'M2V' or 'Total'
    n_answers: int
    n_subjects: int
    n_items: int
    log_odds: float  # posterior mean of β0
    log_odds_sd: float
    preference: float  # expit(β0), in percent
    ci_low: float  # percent
    ci_high: float
    subject_sd: float  # σ_subject (posterior mean of its log, exponentiated)
    item_sd: float

    def as_dict(self) -> dict:
        return asdict(self)


def fit_preference_model(
    df: pd.DataFrame, comparison: str, direction: str = "Total", confidence: float = 0.95
) -> PreferenceFit:
    """Fit the model to the answers of pair type `comparison` (in one direction or both).

    Needs the `item` column (the query id). Items of the two directions are different queries
    (a video vs a music item), so items are keyed by direction and item.
    """
    d = answers(df)
    if "item" not in d.columns:
        raise ValueError("the mixed model needs an 'item' column (the query id)")
    d = d[d["pair_type"] == comparison]
    if direction != "Total":
        d = d[d["direction"] == direction]
    if d.empty:
        raise ValueError(f"no answers for {comparison} ({direction})")
    data = pd.DataFrame(
        {
            "y": d["prefers_first"].astype(float).to_numpy(),
            "subject": d["subject"].astype(str).to_numpy(),
            "item": (d["direction"] + ":" + d["item"].astype(str)).to_numpy(),
        }
    )
    model = _model(data)
    fit = _fit_vb(model)
    beta, beta_sd = float(fit.fe_mean[0]), _laplace_sd(model, fit)
    z = norm.ppf(0.5 + confidence / 2)
    # vc_mean holds the posterior means of log σ, in the order of the vc_formulas' names.
    sds = dict(zip(model.vcp_names, np.exp(fit.vcp_mean), strict=True))
    return PreferenceFit(
        comparison=comparison,
        direction=direction,
        n_answers=len(data),
        n_subjects=data["subject"].nunique(),
        n_items=data["item"].nunique(),
        log_odds=beta,
        log_odds_sd=beta_sd,
        preference=100.0 * expit(beta),
        ci_low=100.0 * expit(beta - z * beta_sd),
        ci_high=100.0 * expit(beta + z * beta_sd),
        subject_sd=float(sds["subject"]),
        item_sd=float(sds["item"]),
    )


def _model(data: pd.DataFrame) -> BinomialBayesMixedGLM:
    """The model `BinomialBayesMixedGLM.from_formula("y ~ 1", {"subject": "0 + C(subject)",
    "item": "0 + C(item)"}, data)` builds, with the same columns in the same order (levels
    sorted) and names, but with the random-effects design built sparse: the formula route
    builds it dense first (answers × (subjects + items), 270 MB at 18,000 answers)."""
    n = len(data)
    codes, levels, names = [], [], []
    for name in ("subject", "item"):
        code, level = pd.factorize(data[name], sort=True)
        codes.append(code)
        levels.append(len(level))
        names += [f"C({name})[{value}]" for value in level]
    # Each answer has two ones: its subject's column, then its item's.
    indices = np.column_stack([codes[0], levels[0] + codes[1]]).ravel()
    exog_vc = sparse.csr_array(
        (np.ones(2 * n), indices, np.arange(0, 2 * n + 1, 2)), shape=(n, sum(levels))
    )
    return BinomialBayesMixedGLM(
        data["y"],
        pd.DataFrame({"Intercept": np.ones(n)}, index=data.index),
        exog_vc,
        np.repeat([0, 1], levels),
        vcp_names=["subject", "item"],
        vc_names=names,
    )


# fit_vb's default optimiser, BFGS, keeps a dense inverse Hessian over all 2 × (3 + subjects +
# items) variational parameters and updates it with dense matrix products: at 1,000 subjects
# and 80 items a fit took 107-320 s and 230 MB, at ~3,800 random effects 90 s an iteration and
# 2.9 GB. L-BFGS-B keeps `maxcor` pairs of vectors instead. gtol is BFGS's stopping rule (the
# largest gradient component ≤ 1e-5); ftol 0 leaves it the only one but for L-BFGS-B's stop
# where f no longer decreases (there fits stopped at 1e-4 or less).
_VB_OPTIONS = {"ftol": 0.0, "gtol": 1e-5, "maxcor": 50}
_VB_ATTEMPTS = 3
_VB_GRADIENT_TOL = 1e-2  # the runs that stopped early stopped at 13-61


def _fit_vb(model: BinomialBayesMixedGLM):
    """fit_vb with L-BFGS-B from fit_vb's seeded random start, run again from where it stopped
    until the ELBO's gradient (in the means and log sds the optimiser moves) is ~0.

    With 1,000 subjects and hundreds of items L-BFGS-B can drive a posterior sd (of β0 or of a
    log σ) to ~e⁻⁴⁰, where the ELBO is nearly flat, and later stop on a failed line search while
    reporting success, its largest gradient component 13-61 and β0 0.01-0.03 off: in 7 of 12
    simulated studies of 1,000 subjects with 300-2,806 items, none of 860 studies of 3-700
    subjects, or of 1,000-2,000 subjects with 80 items. fit_vb raises starting sds to e⁻¹, so
    the next run starts away from that corner; a second run always converged (to Newton-CG's
    optimum where that was checked: tests/analysis/test_mixed.py). Convergence is judged by the
    gradient, not by the optimiser's own flag (which also fails fits stopped at ~1e-5 by
    rounding); a fit whose last run ends with a large gradient warns (ConvergenceWarning), as
    fit_vb did."""
    mean = sd = None
    # One BLAS thread: the ELBO's products are matrix-vector products with n × 1 arrays, which
    # OpenBLAS's threads made 3-30 times slower (and cost CPU) on a busy two-core machine.
    # Trial steps can overflow exp() (the ELBO is then -inf and the line search steps back):
    # no error, nor is a run's ConvergenceWarning, as the gradient is checked after each.
    with (
        threadpool_limits(1, user_api="blas"),
        np.errstate(over="ignore"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(_VB_ATTEMPTS):
            # fit_vb starts from a random point: unseeded, each report's numbers differed a
            # little. The rng is used only when sd is None, i.e. in the first run.
            fit = model.fit_vb(
                mean,
                sd,
                fit_method="L-BFGS-B",
                minim_opts=_VB_OPTIONS,
                rng=np.random.default_rng(0),
            )
            mean, sd = fit.params, np.concatenate([fit.fe_sd, fit.vcp_sd, fit.vc_sd])
            if _vb_gradient(model, mean, sd) <= _VB_GRADIENT_TOL:
                return fit
    warnings.warn("the mixed model's VB fit did not converge", ConvergenceWarning, stacklevel=3)
    return fit


def _vb_gradient(model: BinomialBayesMixedGLM, mean: np.ndarray, sd: np.ndarray) -> float:
    """The largest component of the ELBO's gradient in (means, log sds), fit_vb's variables."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean_grad, sd_grad = model.vb_elbo_grad(mean, sd)
    gradient = np.concatenate([mean_grad, sd_grad * sd])
    return float(np.max(np.abs(gradient))) if np.isfinite(gradient).all() else np.inf


def _laplace_sd(model: BinomialBayesMixedGLM, fit) -> float:
    """β0's posterior sd with its correlation to the random intercepts taken into account.

    H = A'WA + diag(prior precisions), A = [X | Z] (fixed | random-effect design), W = p(1-p),
    splits into blocks [[F, B], [B', R]] with F = X'WX + diag(1/fe_p²), B = X'WZ and
    R = Z'WZ + diag(1/σ²) (sparse). The fixed effects' block of H⁻¹ is the inverse of the Schur
    complement F - B R⁻¹ B', so only a sparse solve with R is needed, not a dense inverse of H."""
    x, z = np.asarray(model.exog, dtype=float), sparse.csr_array(model.exog_vc)
    p = expit(x @ fit.fe_mean + z @ fit.vc_mean)
    w = p * (1.0 - p)
    wz = z.multiply(w[:, None]).tocsr()  # diag(w) Z, as sparse as Z
    fixed = (x * w[:, None]).T @ x + np.diag(np.full(model.k_fep, 1.0 / model.fe_p**2))
    cross = np.asarray((wz.T @ x).T)  # B = X'WZ, k_fep × k_vc
    random = (z.T @ wz + sparse.diags_array(np.exp(-2.0 * fit.vcp_mean[model.ident]))).tocsc()
    # R is symmetric: a minimum-degree ordering of R + R' keeps its LU's fill-in small.
    lu = splu(random, permc_spec="MMD_AT_PLUS_A")
    schur = fixed - cross @ lu.solve(np.ascontiguousarray(cross.T))
    return float(np.sqrt(np.linalg.inv(schur)[0, 0]))
