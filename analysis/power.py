"""How many subjects a study needs: power by simulation of the mixed model.

Each simulated study draws, for every subject, `questions_per_subject` distinct query items
out of `items`, and answers them from the model of `analysis.mixed`:

    logit P(first kind preferred) = logit(effect) + u_subject + v_item,
    u ~ N(0, subject_sd²), v ~ N(0, item_sd²)  (v drawn once per simulated study),

so `effect` is the preference of a typical subject on a typical item, the quantity the mixed
model reports. The test per simulated study must be fast and must treat both subjects and
items as random: a by-subject t-test alone treats the study's items as fixed and, with
item_sd = 0.5 and 100 items, rejects a true 50% in ~15% of 200-subject studies. So we use
Clark's (1973) min F′ = F1·F2 / (F1 + F2), which combines the by-subject test (F1 = t², a
one-sample t-test of the subjects' shares against 50%) and the by-item test (F2, the same over
the items' shares), with denominator df (F1 + F2)² / (F1²/df2 + F2²/df1). It is conservative:
with no preference and the default spreads it rejects in 1.6–3% of studies at `alpha` = 0.05
(0.4–0.6% without spreads; 3000 simulations, 10–100 subjects, 60 items, 20 questions each),
so the plan errs towards more subjects (a 60/40 preference, 60 items, 20 questions each, 80%
power: 42 subjects at `alpha` 0.05, 46 with some seeds). It is a plan for the design, not
the test the report runs (Wilcoxon over subjects, the exact binomial, the mixed model). Power at each study size is the
share of simulations that reject at level `alpha`. Sizes reuse the same simulated subjects
(the first n of them), so the power curve is smooth and cheap; the answer is the smallest
size whose power reaches each target with the simulation's noise taken off (power − 2 ·
mc_se): by the estimate alone, another seed's answer differed (38 or 42 subjects, whose power
an audit measured at 0.780 ± 0.009 and 0.824 ± 0.009 over 2,000 studies each).
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import expit, logit

DEFAULT_GRID = np.unique(np.round(np.geomspace(4, 1000, 60)).astype(int))


@dataclass(frozen=True)
class PowerPlan:
    effect: float
    items: int
    questions_per_subject: int
    subject_sd: float
    item_sd: float
    alpha: float
    sims: int
    curve: pd.DataFrame = field(repr=False)  # n_subjects, power, mc_se
    # target power → smallest n_subjects reaching it, noise taken off (None: not in the grid)
    needed: dict


def simulate_answers(rng, effect, items, questions_per_subject, n_subjects, subject_sd, item_sd):
    """One simulated study: (items asked, answers) as two n_subjects × questions arrays; an
    answer is True when the first kind was preferred."""
    item_effect = rng.normal(0.0, item_sd, items)
    subject_effect = rng.normal(0.0, subject_sd, n_subjects)
    # argpartition of uniform noise: a uniformly random set of distinct items per subject
    asked = rng.random((n_subjects, items)).argpartition(questions_per_subject - 1, axis=1)
    asked = asked[:, :questions_per_subject]
    p = expit(logit(effect) + subject_effect[:, None] + item_effect[asked])
    return asked, rng.random(p.shape) < p


def _f_statistic(total, squares, count):
    """F = t² of a one-sample t-test of values against 0 from their sum, sum of squares, count."""
    mean = total / count
    var = np.maximum(squares - count * mean**2, 0.0) / (count - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return mean**2 / (var / count)


def min_f_rejects(asked, answers, sizes, items, alpha) -> np.ndarray:
    """For each n in `sizes`, whether min F′ on the first n subjects' answers rejects 50%."""
    x = answers.mean(axis=1) - 0.5  # subjects' shares
    f1 = _f_statistic(np.cumsum(x)[sizes - 1], np.cumsum(x * x)[sizes - 1], sizes)
    df1 = sizes - 1
    # Items' answer counts and sums over the first n subjects, for every n at once.
    cell = (np.arange(len(asked))[:, None] * items + asked).ravel()
    shape = (len(asked), items)
    count = np.bincount(cell, minlength=shape[0] * items).reshape(shape)
    hits = np.bincount(cell, answers.ravel(), minlength=shape[0] * items).reshape(shape)
    count, hits = np.cumsum(count, axis=0)[sizes - 1], np.cumsum(hits, axis=0)[sizes - 1]
    seen = count > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(seen, hits / count - 0.5, 0.0)  # items' shares
    k = seen.sum(axis=1)
    f2 = _f_statistic(y.sum(axis=1), (y * y).sum(axis=1), k)
    df2 = k - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        # F is infinite where every share is the same (all subjects at 100%): take the limits,
        # min F′ → the other F and its df, so the strongest preferences still reject.
        min_f = np.where(np.isinf(f1), f2, np.where(np.isinf(f2), f1, f1 * f2 / (f1 + f2)))
        df = (f1 + f2) ** 2 / (f1**2 / df2 + f2**2 / df1)
        df = np.where(np.isinf(f1), df2, np.where(np.isinf(f2), df1, df))
        p = stats.f.sf(min_f, 1, df)
    return np.nan_to_num(p, nan=1.0) < alpha


def plan_power(
    effect: float,
    items: int,
    questions_per_subject: int,
    n_subjects_grid=None,
    power=(0.8, 0.9),
    sims: int = 1000,
    seed: int = 0,
    subject_sd: float = 0.5,
    item_sd: float = 0.5,
    alpha: float = 0.05,
) -> PowerPlan:
    """Simulate the power of a study per number of subjects (see the module's docstring)."""
    if not 0.0 < effect < 1.0:
        raise ValueError("effect is a preference share, strictly between 0 and 1 (e.g. 0.56)")
    if items < 2 or not 1 <= questions_per_subject <= items:
        raise ValueError("questions_per_subject must be between 1 and the number of items")
    sizes = np.unique(np.asarray(DEFAULT_GRID if n_subjects_grid is None else n_subjects_grid))
    if sizes.min() < 2:
        raise ValueError("a study needs at least 2 subjects for the test")
    rng = np.random.default_rng(seed)
    rejections = np.zeros(len(sizes))
    for _ in range(sims):
        asked, answers = simulate_answers(
            rng, effect, items, questions_per_subject, int(sizes.max()), subject_sd, item_sd
        )
        rejections += min_f_rejects(asked, answers, sizes, items, alpha)
    share = rejections / sims
    curve = pd.DataFrame(
        {"n_subjects": sizes, "power": share, "mc_se": np.sqrt(share * (1 - share) / sims)}
    )
    needed = {}
    for target in power:
        reached = sizes[share - 2 * curve["mc_se"].to_numpy() >= target]
        needed[target] = int(reached.min()) if len(reached) else None
    return PowerPlan(
        effect, items, questions_per_subject, subject_sd, item_sd, alpha, sims, curve, needed
    )
