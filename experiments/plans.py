"""Question plans: which query and which two candidates each question of a subject shows.

A pure function of the collection's test items, the systems' ranked search results, the study's
configuration, a seed and the subject's ordinal (no database), so that it can be tested on its
own and every plan can be regenerated exactly. The rules (the project's design, and more):

- a video→music block, then a music→video block;
- per block, `per_type` questions of every comparison, shuffled; no query twice in a block;
- S = a system's best-ranked result that is not the query's ground truth (G);
  R = a random test item that is neither G nor any system's S for that query;
- a comparison that would show one item twice (two systems agree on S) is not asked for that
  query: another query takes its place;
- the first-named candidate is shown as A in exactly half of each comparison's questions
  (one more or less when `per_type` is odd);
- across subjects each query's comparison rotates: with the block's queries dealt into one
  class per comparison (a permutation fixed by the seed), subject o asks comparison t of the
  queries in class (t − o) mod C, so C consecutive subjects ask each query every comparison;
  which `per_type` queries of a class are used moves on every C subjects;
- R is drawn when its question comes, among the items the subject has met as they met the
  candidate shown beside it (seen beside this query before, a query before, how often shown),
  so that how a candidate was met does not tell G from R (`_Exposure`), catch questions
  (`with_catch_questions`) included; never an item a catch question has shown with its
  pairing (the subject knows it is not G).
"""

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import linear_sum_assignment

DIRECTIONS = ("V2M", "M2V")
GROUND_TRUTH, RANDOM, BROKEN = "G", "R", "X"
CATCH_PAIR_TYPE = "GX"
IMPOSSIBLE = 1e12  # assignment cost of a query that cannot serve a comparison
# A system's label: one capital letter and optional digits (so that pair-type names such as
# 'GS1' split back into their kinds), other than the reserved G, R and X.
SYSTEM_LABEL = re.compile(r"(?![GRX])[A-Z]\d*")

Comparison = tuple[str, str]
Results = Mapping[tuple[str, str, str], Sequence[str]]


class PlanError(ValueError):
    """The study cannot be planned (collection too small, results missing, bad configuration)."""


@dataclass(frozen=True)
class PlannedQuestion:
    position: int  # 1-based, over both blocks
    direction: str  # 'V2M' | 'M2V'
    pair_type: str  # 'GR', 'GS', 'SR' with one system; 'G-S1', 'S1-S2', … with several
    query: str  # pair key of the query item (of the direction's source modality)
    option_a: str  # pair keys of the candidates (of the other modality)
    option_b: str
    kind_a: str  # 'G', 'R' or a system label ('X': a catch question's broken media)
    kind_b: str
    is_catch: bool = False


def default_comparisons(labels: Sequence[str] = ("S",)) -> list[Comparison]:
    """The paper's G-R, G-S, S-R for each system, plus every system against every other."""
    comparisons = [(GROUND_TRUTH, RANDOM)]
    comparisons += [(GROUND_TRUTH, label) for label in labels]
    comparisons += [(label, RANDOM) for label in labels]
    comparisons += [(a, b) for i, a in enumerate(labels) for b in labels[i + 1 :]]
    return comparisons


def pair_type_name(comparison: Comparison) -> str:
    """'GR', 'GS', 'SR' for one-letter kinds (the paper's names), else 'G-S1', 'S1-S2'."""
    first, second = comparison
    return first + second if len(first) == len(second) == 1 else f"{first}-{second}"


def min_test_items(per_type: int = 20, comparisons: Sequence[Comparison] | None = None) -> int:
    """The fewest test pairs a study needs: every question of a block has its own query."""
    return per_type * len(comparisons or default_comparisons())


@dataclass(frozen=True)
class Catch:
    """A study's attention checks: how many, the collection's broken item (`key`) and ready
    items of other splits that may be their queries (`spare_keys`)."""

    key: str
    count: int
    spare_keys: Sequence[str] = ()


def build_plan(
    test_keys: Sequence[str],
    results: Results,
    per_type: int = 20,
    seed: int = 0,
    ordinal: int = 0,
    comparisons: Sequence[Sequence[str]] | None = None,
    labels: Sequence[str] = ("S",),
    catch: Catch | None = None,
) -> list[PlannedQuestion]:
    """The plan of subject number `ordinal` (0-based) of a study, with `catch` questions.

    `results` maps (system label, direction, query key) to that system's ranked result keys.
    Raises PlanError when the collection cannot give every question its own query.
    """
    labels = tuple(labels)
    comparisons = check_design(test_keys, per_type, comparisons, labels)
    keys = sorted(set(test_keys))
    plan: list[PlannedQuestion] = []
    found_for = {}  # (direction, query) → each kind's item but R's
    rngs = {}
    for d, direction in enumerate(DIRECTIONS):
        rng = rngs[direction] = np.random.default_rng([seed, d, ordinal, 1])
        for comparison, key, kinds, found in _plan_block(
            keys, results, direction, d, per_type, seed, ordinal, comparisons, labels, rng
        ):
            found_for[direction, key] = found
            options = (found.get(kinds[0], ""), found.get(kinds[1], ""))  # R: drawn below
            plan.append(
                PlannedQuestion(
                    len(plan) + 1, direction, pair_type_name(comparison), key, *options, *kinds
                )
            )
    # Besides test items a plan may show systems' results of other splits (uploaded ranks)
    # and catch questions' items.
    others = {r for ranked in results.values() for r in ranked}
    if catch:
        plan = with_catch_questions(
            plan, keys, catch.key, catch.count, seed, ordinal, catch.spare_keys
        )
        others |= {catch.key, *catch.spare_keys}
    # R is drawn in the order the subject meets the questions, catch questions included.
    seen = _Exposure(keys, others - set(keys))
    paired: set[str] = set()  # items a catch question has shown with their own pairing
    for i, q in enumerate(plan):
        if i == 0 or q.direction != plan[i - 1].direction:
            seen.new_block(q.direction)
        if RANDOM in (q.kind_a, q.kind_b):
            found = found_for[q.direction, q.query]
            shown = q.option_b if q.kind_a == RANDOM else q.option_a
            excluded = {v for v in found.values() if v is not None}
            # Such an item is not this query's G, as the subject knows: where others are left.
            if len(keys) > len(excluded | paired & seen.test_keys):
                excluded |= paired
            r = seen.lookalike(q.query, shown, excluded, rngs[q.direction])
            plan[i] = q = replace(q, **{"option_a" if q.kind_a == RANDOM else "option_b": r})
        if q.is_catch:
            paired.add(q.query)
        seen.show(q.query, q.option_a, q.option_b)
    return plan


class _Exposure:
    """What a subject has seen so far of each item (a modality and a pair key), so that R is
    drawn to look like the candidate shown beside it: otherwise how a candidate was met before
    tells the ground truth apart (it is the one item whose own question is now, so it has been
    shown less often than a random item), as an audit's simulated subjects found ("pick the
    candidate shown less often in this block" chose G in 61% of G-R questions)."""

    WEIGHTS = (100, 10, 3, 1)  # beside this query, a former query, shown in the block, at all

    def __init__(self, keys: Sequence[str], others=()):
        """`keys`: the test items, R's candidates; `others`: other items a plan may show."""
        self.keys = [*keys, *sorted(others)]
        self.test_keys = set(keys)
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.n_keys = len(keys)
        zeros = {m: np.zeros(len(self.index), int) for m in ("video", "music")}
        self.session = {m: z.copy() for m, z in zeros.items()}
        self.queries = {m: z.copy() for m, z in zeros.items()}
        self.beside: defaultdict = defaultdict(set)  # (modality, key) → the items shown with it

    def new_block(self, direction: str):
        self.source, self.target = ("video", "music") if direction == "V2M" else ("music", "video")
        self.block = {m: np.zeros_like(counts) for m, counts in self.session.items()}

    def show(self, query: str, *options: str):
        q = self.index[query]
        t = [self.index[o] for o in options]
        for counts in (self.session, self.block):
            counts[self.source][q] += 1
            np.add.at(counts[self.target], t, 1)
        self.queries[self.source][q] = 1
        self.beside[self.source, query].update((self.target, o) for o in options)
        for o in options:
            self.beside[self.target, o].add((self.source, query))

    def lookalike(self, query: str, shown: str, excluded, rng) -> str:
        """A random item, neither G nor any system's S (`excluded`), among those the subject
        has met as it met `shown`."""
        near = np.zeros(len(self.index), int)
        near[[self.index[k] for m, k in self.beside[self.source, query] if m == self.target]] = 1
        looks = np.stack(
            [near, self.queries[self.target], self.block[self.target], self.session[self.target]]
        )
        distance = np.array(self.WEIGHTS) @ np.abs(looks - looks[:, [self.index[shown]]])
        allowed = np.arange(len(self.index)) < self.n_keys  # R is a test item
        allowed[[self.index[k] for k in excluded]] = False
        best = np.flatnonzero(allowed & (distance == distance[allowed].min()))
        return self.keys[best[rng.integers(len(best))]]


QUERIES_PER_TEST_PAIR = 0.1  # at most a tenth of the test pairs are a block's queries


def reuse_note(n_test: int, per_type: int = 20, n_comparisons: int = 3) -> str | None:
    """What a study with so few test pairs for its questions should know, or None.

    A subject meets the same items again when a block's queries are a large share of the
    test pairs: in the other block (a query's pairing seen beside its ground truth) and as
    candidates (an item is the ground truth once a block, so how often it has appeared hints
    at its role). An audit of a study asking every one of its 60 test pairs in each block
    found rules built on that choosing the ground truth in 69-82% of G-R questions. With ten
    times more test pairs than queries a block (the paper: 1,000 for 60), few questions
    repeat anything.
    """
    asked = per_type * n_comparisons
    if n_test * QUERIES_PER_TEST_PAIR >= asked:
        return None
    return (
        f"{n_test} test pairs for {asked} queries a block: subjects meet items again, and "
        "remembering them can hint at the ground truth; "
        f"{int(np.ceil(asked / QUERIES_PER_TEST_PAIR))} or more test pairs avoid most of it"
    )


def check_design(
    test_keys: Sequence[str],
    per_type: int = 20,
    comparisons: Sequence[Sequence[str]] | None = None,
    labels: Sequence[str] = ("S",),
) -> list[Comparison]:
    """The design's comparisons, or PlanError for a design these test pairs cannot serve
    whatever the systems find (checked before any training, and by every plan)."""
    comparisons = _checked_comparisons(comparisons, tuple(labels))
    if per_type < 1:
        raise PlanError("per_type must be at least 1")
    available = len(set(test_keys))
    needed = per_type * len(comparisons)
    if available < needed:
        raise PlanError(
            f"The collection is too small for this study: a block asks {needed} questions "
            f"({len(comparisons)} comparisons × {per_type}), each with its own query, but the "
            f"test split has only {available} ready pairs."
        )
    return comparisons


def label_problem(label: str) -> str | None:
    """Why `label` cannot name a system in a study, or None when it can."""
    if SYSTEM_LABEL.fullmatch(label):
        return None
    if label in (GROUND_TRUTH, RANDOM, BROKEN):
        return f"'{label}' is reserved (G: ground truth, R: random, X: catch media)"
    return f"{label!r} is not a system label: one capital letter and digits, e.g. S, S1, S2"


def _checked_comparisons(comparisons, labels) -> list[Comparison]:
    if not labels or len(set(labels)) != len(labels):
        raise PlanError(f"System labels must be distinct and at least one: {labels!r}")
    if problems := [p for p in map(label_problem, labels) if p]:
        raise PlanError("; ".join(problems))
    if not comparisons:
        return default_comparisons(labels)
    checked = [tuple(c) for c in comparisons]
    kinds = {GROUND_TRUTH, RANDOM, *labels}
    for comparison in checked:
        if len(comparison) != 2 or not set(comparison) <= kinds or comparison[0] == comparison[1]:
            raise PlanError(
                f"Bad comparison {list(comparison)!r}: two different kinds out of {sorted(kinds)}"
            )
    if len({frozenset(c) for c in checked}) != len(checked):
        raise PlanError(f"A comparison is listed twice: {checked!r}")
    return checked


def _plan_block(keys, results, direction, d, per_type, seed, ordinal, comparisons, labels, rng):
    """One direction's questions, in the order asked, as (comparison, query, kinds in A/B
    order, each kind's item but R's), R to be drawn when the question comes."""
    n_types = len(comparisons)
    # Fixed for the study (seed and direction only), so that rotation across subjects is exact.
    order = np.random.default_rng([seed, d]).permutation(len(keys))
    classes = [[keys[i] for i in order[c::n_types]] for c in range(n_types)]

    def candidates(key):
        """Each kind's item for this query, or None where a system has nothing to offer."""
        found = {GROUND_TRUTH: key}
        for label in labels:
            ranked = results.get((label, direction, key), ())
            found[label] = next((r for r in ranked if r != key), None)
        return found

    found_for = {key: candidates(key) for key in keys}

    def feasible(key, comparison):
        found = found_for[key]
        shown = [found[kind] for kind in comparison if kind != RANDOM]
        if None in shown or len(set(shown)) != len(shown):
            return False
        # R needs an item that is neither G nor any system's S for this query.
        return RANDOM not in comparison or len(keys) > len({v for v in found.values() if v})

    # Subject `ordinal` prefers, for comparison t, the queries of class (t - ordinal) mod C,
    # from a window that moves on every C subjects, then any other query. An optimal
    # assignment of queries to question slots keeps those preferences where it can and still
    # finds queries for every slot when some comparisons are impossible for some queries.
    position = {key: p for p, key in enumerate(keys[i] for i in order)}
    cost = np.empty((n_types, len(keys)))
    for t, comparison in enumerate(comparisons):
        cls = classes[(t - ordinal) % n_types]
        start = (ordinal // n_types) * per_type % len(cls)
        rotated = cls[start:] + cls[:start]
        rank = {key: r for r, key in enumerate(rotated)}
        for i, key in enumerate(keys):
            cost[t, i] = rank.get(key, len(keys) + position[key])
            if not feasible(key, comparison):
                cost[t, i] = IMPOSSIBLE
    slots, items = linear_sum_assignment(np.repeat(cost, per_type, axis=0))
    chosen: list[list[str]] = [[] for _ in comparisons]
    for slot, item in zip(slots, items, strict=True):
        t = slot // per_type
        if cost[t, item] == IMPOSSIBLE:
            raise PlanError(
                f"Not enough {direction} queries for {pair_type_name(comparisons[t])} beside the "
                f"other comparisons: every question needs its own query, and a comparison needs "
                "queries where its candidates all differ (systems that agree on a query cannot "
                "be compared there) and every system needs search results."
            )
        chosen[t].append(keys[item])

    block = []
    for t, comparison in enumerate(comparisons):
        first_is_a = np.arange(per_type) < per_type // 2
        if per_type % 2 and rng.random() < 0.5:
            first_is_a = ~first_is_a
        rng.shuffle(first_is_a)
        for key, a_first in zip(chosen[t], first_is_a, strict=True):
            kinds = comparison if a_first else comparison[::-1]
            block.append((comparison, key, kinds, found_for[key]))
    return [block[i] for i in rng.permutation(len(block))]


def with_catch_questions(
    plan: Sequence[PlannedQuestion],
    test_keys: Sequence[str],
    catch_key: str,
    count: int,
    seed: int = 0,
    ordinal: int = 0,
    spare_keys: Sequence[str] = (),
) -> list[PlannedQuestion]:
    """`plan` with `count` attention checks inserted at random positions, never two in a row.

    A catch question asks a query against its own ground truth (G) and the collection's broken
    item `catch_key` (X: black picture, silent sound), so its right answer is unambiguous. Each
    takes one of the gaps between the plan's questions (before the first, between two, after
    the last), at most one per gap, so no two are adjacent; it belongs to the block of the
    question after it (the last gap: the one before). Its query is one that no block asks
    about: a test item, else one of `spare_keys` (ready items of other splits), else one its
    block does not ask about (first one whose question in a later block does not show its
    ground truth: a catch question shows its query beside G, which would give that question
    away), else, when the collection has no other, a query whose question in the block does
    not show its ground truth (having seen the query beside G would give the catch question
    away).
    Positions are renumbered 1…len(plan)+count.
    """
    if count < 0 or count > len(plan) + 1:
        raise PlanError(f"Cannot place {count} catch questions among {len(plan)} questions")
    rng = np.random.default_rng([seed, ordinal, 2])
    gaps = set(rng.choice(len(plan) + 1, size=count, replace=False).tolist()) if plan else set()
    keys = sorted(set(test_keys) - {catch_key})
    if count and not keys:
        raise PlanError("Catch questions need at least one test pair")
    spare = sorted(set(spare_keys) - set(keys) - {catch_key})
    asked = {d: {q.query for q in plan if q.direction == d} for d in DIRECTIONS}
    shown_g = {
        d: {q.query for q in plan if q.direction == d and GROUND_TRUTH in (q.kind_a, q.kind_b)}
        for d in DIRECTIONS
    }
    out: list[PlannedQuestion] = []
    for gap in range(len(plan) + 1):
        if gap in gaps:
            direction = plan[min(gap, len(plan) - 1)].direction
            # A test item of neither block first: one of the other block would show its
            # pairing before that block asks about it (spare items are asked about nowhere).
            anywhere = asked["V2M"] | asked["M2V"]
            fresh = [k for k in keys if k not in anywhere]
            fresh = fresh or [k for k in spare if k not in asked[direction]]
            # The other block is still to come for a video→music catch: not one of its G's.
            later = shown_g["M2V"] if direction == DIRECTIONS[0] else set()
            fresh = fresh or [k for k in keys if k not in asked[direction] | later]
            fresh = fresh or [k for k in keys if k not in asked[direction]]
            fresh = fresh or [k for k in keys if k not in shown_g[direction]] or keys
            query = fresh[rng.integers(len(fresh))]
            asked[direction].add(query)
            shown_g[direction].add(query)
            kinds = (GROUND_TRUTH, BROKEN) if rng.random() < 0.5 else (BROKEN, GROUND_TRUTH)
            options = [query if kind == GROUND_TRUTH else catch_key for kind in kinds]
            out.append(
                PlannedQuestion(
                    len(out) + 1, direction, CATCH_PAIR_TYPE, query, *options, *kinds, True
                )
            )
        if gap < len(plan):
            out.append(replace(plan[gap], position=len(out) + 1))
    return out
