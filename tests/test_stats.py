"""Tests of the shared statistics: bootstrap intervals and stable seeds."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from auditkit import stats
from auditkit.stats import (
    auroc_from_counts,
    bootstrap_ci,
    bootstrap_cis,
    bootstrap_indices,
    median_centred_interval,
    percentile_interval,
    resample_counts,
    stable_seed,
)


def test_stable_seed_is_stable_distinct_and_in_range() -> None:
    assert stable_seed(0, "calibration") == stable_seed(0, "calibration")
    assert stable_seed(0, "calibration") != stable_seed(1, "calibration")
    assert stable_seed("sex", "F") != stable_seed("sexF")
    # A hard-coded value guards against accidental changes of the derivation, which would
    # silently change every interval of every audit.
    assert stable_seed(0, "calibration") == 7547407440569519578
    for parts in [(), (0,), ("a", 1, 2.5)]:
        assert 0 <= stable_seed(*parts) < 2**63


def test_bootstrap_indices_shape_and_range() -> None:
    idx = bootstrap_indices(7, n_boot=50, rng=np.random.default_rng(0))
    assert idx.shape == (50, 7)
    assert idx.min() >= 0
    assert idx.max() < 7
    assert bootstrap_indices(0, n_boot=3, rng=np.random.default_rng(0)).shape == (3, 0)


def test_stratified_indices_keep_class_counts() -> None:
    strata = np.array(["a"] * 5 + ["b"] * 2 + ["c"] * 13)
    np.random.default_rng(1).shuffle(strata)
    idx = bootstrap_indices(strata.size, n_boot=200, rng=np.random.default_rng(2), strata=strata)
    # Every column is resampled within its own stratum, so every resample keeps the counts.
    assert (strata[idx] == strata[None, :]).all()
    values, counts = np.unique(strata[idx[17]], return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist(), strict=True)) == {"a": 5, "b": 2, "c": 13}
    # ... and actually resamples (not the identity).
    assert len({tuple(row) for row in idx.tolist()}) > 1


def test_stratified_indices_reject_wrong_length() -> None:
    with pytest.raises(ValueError, match="strata"):
        bootstrap_indices(4, n_boot=2, rng=np.random.default_rng(0), strata=[0, 1])


def test_bootstrap_is_deterministic_under_the_seed() -> None:
    x = np.random.default_rng(3).normal(size=40)
    first = bootstrap_ci(np.mean, x, rng=np.random.default_rng(7))
    again = bootstrap_ci(np.mean, x, rng=np.random.default_rng(7))
    other = bootstrap_ci(np.mean, x, rng=np.random.default_rng(8))
    assert first == again
    assert first != other


def test_interval_contains_the_point_estimate_of_the_mean() -> None:
    x = np.random.default_rng(4).normal(loc=2.0, size=200)
    interval = bootstrap_ci(np.mean, x, rng=np.random.default_rng(0))
    assert interval is not None
    lo, hi = interval
    assert lo < x.mean() < hi
    # Roughly the normal-theory width 2 * 1.96 * sd / sqrt(n).
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / math.sqrt(x.size), rel=0.2)


def test_plain_and_batched_conventions_agree() -> None:
    x = np.random.default_rng(5).exponential(size=60)
    y = np.random.default_rng(6).normal(size=60)

    def plain(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(a * b))

    def batched(idx: np.ndarray) -> np.ndarray:
        return np.mean(x[idx] * y[idx], axis=1)

    slow = bootstrap_ci(plain, x, y, n_boot=300, rng=np.random.default_rng(9))
    fast = bootstrap_ci(batched, x, y, n_boot=300, rng=np.random.default_rng(9), batched=True)
    assert slow is not None
    assert fast is not None
    assert slow == pytest.approx(fast, abs=1e-12)


def test_none_when_too_few_rows_or_disabled() -> None:
    rng = np.random.default_rng(0)
    assert bootstrap_ci(np.mean, np.array([1.0]), rng=rng) is None
    assert bootstrap_ci(np.mean, np.array([]), rng=rng) is None
    assert bootstrap_ci(np.mean, np.arange(5.0), n_boot=0, rng=rng) is None


def test_undefined_replicates_are_ignored_up_to_ten_percent() -> None:
    x = np.arange(30.0)

    def undefined_in(fraction: float) -> Callable[[np.ndarray], np.ndarray]:
        def statistic(idx: np.ndarray) -> np.ndarray:
            out = x[idx].mean(axis=1)
            out[: round(fraction * idx.shape[0])] = np.nan
            return out

        return statistic

    rng = np.random.default_rng(0)
    assert bootstrap_ci(undefined_in(0.05), x, n_boot=200, rng=rng, batched=True) is not None
    assert bootstrap_ci(undefined_in(0.10), x, n_boot=200, rng=rng, batched=True) is not None
    assert bootstrap_ci(undefined_in(0.15), x, n_boot=200, rng=rng, batched=True) is None


def test_plain_statistic_raising_counts_as_undefined() -> None:
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])

    def prevalence_ratio(y: np.ndarray) -> float:
        return float(y.sum() / (y == 1).sum())  # NaN (0/0) when the resample lacks a positive

    # Without stratification about a third of the resamples lack the single positive.
    assert bootstrap_ci(prevalence_ratio, labels, n_boot=200, rng=np.random.default_rng(0)) is None
    # Stratified by class, every resample keeps it.
    assert bootstrap_ci(prevalence_ratio, labels, n_boot=200, rng=np.random.default_rng(0), strata=labels) == (1.0, 1.0)


def test_bootstrap_cis_share_one_draw() -> None:
    x = np.random.default_rng(1).normal(size=50)
    out = bootstrap_cis(
        {"a": lambda idx: x[idx].mean(axis=1), "b": lambda idx: x[idx].mean(axis=1)},
        x.size,
        rng=np.random.default_rng(0),
    )
    assert out["a"] == out["b"]
    assert out["a"] is not None


def test_blocked_draws_equal_one_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(2).normal(size=10)
    statistic = {"mean": lambda idx: x[idx].mean(axis=1)}
    whole = bootstrap_cis(statistic, 10, n_boot=55, rng=np.random.default_rng(0))
    monkeypatch.setattr(stats, "_MAX_BLOCK_ELEMENTS", 100)  # blocks of 10 resamples
    blocked = bootstrap_cis(statistic, 10, n_boot=55, rng=np.random.default_rng(0))
    assert whole == blocked


def test_wrong_shapes_and_alpha_are_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="first dimension"):
        bootstrap_ci(np.mean, np.arange(3.0), np.arange(4.0), rng=rng)
    with pytest.raises(ValueError, match="at least one array"):
        bootstrap_ci(np.mean, rng=rng)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(np.mean, np.arange(3.0), rng=rng, alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        bootstrap_cis({"bad": lambda idx: np.zeros(3)}, 5, n_boot=10, rng=rng)


def test_percentile_interval() -> None:
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert percentile_interval([]) is None
    assert percentile_interval([np.nan, np.inf]) is None
    assert percentile_interval(np.r_[np.arange(100.0), np.nan]) is not None


# --------------------------------------------------------------------------------------------
# The median-centred percentile interval: every interval contains its estimate


def test_median_centred_interval_hand_computed() -> None:
    replicates = [1.0, 2.0, 3.0, 4.0, 5.0]  # quartiles 2, 3, 4 (linear interpolation)
    # Estimate below the median: the percentile interval (2, 4) moves down by 1.5.
    assert median_centred_interval(replicates, 1.5, alpha=0.5) == (0.5, 2.5)
    # ... above it: up by 1.
    assert median_centred_interval(replicates, 4.0, alpha=0.5) == (3.0, 5.0)
    # The median is the estimate: exactly the percentile interval.
    assert median_centred_interval(replicates, 3.0, alpha=0.5) == percentile_interval(replicates, alpha=0.5) == (2, 4)
    assert median_centred_interval(np.arange(101.0), 50.0) == pytest.approx((2.5, 97.5))
    # A point-mass bootstrap away from the estimate gives the estimate itself.
    assert median_centred_interval([2.0, 2.0, 2.0], 1.0) == (1.0, 1.0)
    # Skew is kept: (Q(.5) - Q(.025), Q(.975) - Q(.5)) = (0.5, 4.5) around the estimate 10.
    skewed = np.r_[np.full(50, 1.0), np.full(50, 1.5), [6.0] * 5]
    lo_q, mid, hi_q = np.quantile(skewed, [0.025, 0.5, 0.975])
    assert median_centred_interval(skewed, 10.0) == pytest.approx((10.0 - (mid - lo_q), 10.0 + (hi_q - mid)))


def test_median_centred_interval_fixes_the_demo_ece_after_temperature() -> None:
    # The demo's calibration.ece_after_temperature: 0.0142 with the percentile interval
    # [0.0143, 0.0598] -- every replicate above the estimate, as a biased ECE near 0 gives.
    rng = np.random.default_rng(0)
    replicates = 0.0143 + rng.gamma(2.0, 0.008, size=1000)
    percentile = percentile_interval(replicates)
    assert percentile is not None and percentile[0] > 0.0142
    lo, hi = median_centred_interval(replicates, 0.0142, bounds=(0.0, 1.0)) or (np.nan, np.nan)
    assert 0.0 <= lo <= 0.0142 <= hi < percentile[1]


def test_median_centred_interval_bounds_undefined_and_errors() -> None:
    # Cut to the statistic's range, never past the estimate.
    assert median_centred_interval([0.1, 0.2, 0.3], 0.0, alpha=0.5) == pytest.approx((-0.05, 0.05))
    assert median_centred_interval([0.1, 0.2, 0.3], 0.0, alpha=0.5, bounds=(0.0, 1.0)) == pytest.approx((0.0, 0.05))
    assert median_centred_interval([0.8, 0.9, 1.0], 1.0, alpha=0.5, bounds=(0.0, 1.0)) == pytest.approx((0.95, 1.0))
    # An estimate outside the range stays inside its interval.
    assert median_centred_interval([1.0, 2.0], 5.0, alpha=0.5, bounds=(0.0, 1.0)) == pytest.approx((4.75, 5.0))
    # Undefined estimate or too many undefined replicates: no interval.
    assert median_centred_interval([1.0, 2.0], math.nan) is None
    assert median_centred_interval([], 1.0) is None
    assert median_centred_interval([np.nan] * 2 + [1.0] * 8, 1.0) is None
    assert median_centred_interval([np.nan] + [1.0] * 9, 1.0) == (1.0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        median_centred_interval([1.0], 1.0, alpha=0.0)
    with pytest.raises(ValueError, match="bounds"):
        median_centred_interval([1.0], 1.0, bounds=(1.0, 0.0))


finite_values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    replicates=st.lists(finite_values, min_size=1, max_size=60),
    estimate=finite_values,
    alpha=st.floats(min_value=0.01, max_value=0.5),
    shift=st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
)
def test_median_centred_interval_properties(
    replicates: list[float], estimate: float, alpha: float, shift: float
) -> None:
    values = np.asarray(replicates)
    interval = median_centred_interval(values, estimate, alpha=alpha)
    assert interval is not None
    lo, hi = interval
    assert lo <= estimate <= hi  # always, whatever the bias of the replicates
    # Width and skew are the bootstrap distribution's.
    q_lo, q_mid, q_hi = np.quantile(values, [alpha / 2, 0.5, 1 - alpha / 2])
    tolerance = 1e-9 * (1.0 + abs(estimate) + np.abs(values).max())
    assert estimate - lo == pytest.approx(q_mid - q_lo, abs=tolerance)
    assert hi - estimate == pytest.approx(q_hi - q_mid, abs=tolerance)
    # It reduces to the percentile interval when the bootstrap median is the estimate.
    assert median_centred_interval(values, float(q_mid), alpha=alpha) == percentile_interval(values, alpha=alpha)
    # Shifting replicates and estimate together shifts the interval.
    moved = median_centred_interval(values + shift, estimate + shift, alpha=alpha)
    assert moved is not None
    assert moved == pytest.approx((lo + shift, hi + shift), abs=tolerance + 1e-9 * abs(shift))


biased_statistics: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # Biased under resampling, each in its own way: |mean| (the kink of an ECE at zero), the
    # maximum (never above the sample's), the median of a small sample (discrete), a ratio.
    "abs_mean": lambda values: np.abs(values.mean(axis=-1)),
    "max": lambda values: values.max(axis=-1),
    "median": lambda values: np.median(values, axis=-1),
    "ratio": lambda values: values.mean(axis=-1) / (1.0 + np.abs(values).mean(axis=-1)),
}


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-100, max_value=100, allow_nan=False), min_size=2, max_size=30),
    name=st.sampled_from(sorted(biased_statistics)),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_bootstrap_interval_of_a_statistic_contains_its_value(values: list[float], name: str, seed: int) -> None:
    x = np.asarray(values)
    statistic = biased_statistics[name]
    value = float(statistic(x))
    interval = bootstrap_ci(
        lambda idx: statistic(x[idx]), x, n_boot=60, rng=np.random.default_rng(seed), batched=True, estimate=value
    )
    assert interval is not None
    assert interval[0] <= value <= interval[1]
    # Centred on the statistic of the sample whether or not the caller passes it.
    assert bootstrap_ci(lambda idx: statistic(x[idx]), x, n_boot=60, rng=np.random.default_rng(seed), batched=True) == (
        pytest.approx(interval, rel=1e-9, abs=1e-12)
    )


def test_bootstrap_cis_centre_on_the_statistic_of_the_sample_itself() -> None:
    x = np.array([0.0, 0.0, 0.0, 1.0, 3.0])

    def largest(idx: np.ndarray) -> np.ndarray:
        return np.asarray(x[idx].max(axis=1), dtype=np.float64)

    # The maximum of a resample never exceeds the sample's (3.0), and most resamples reach it
    # only by chance: the percentile interval may end below it; this one cannot.
    cis = bootstrap_cis({"max": largest}, x.size, n_boot=200, rng=np.random.default_rng(0))
    assert cis["max"] is not None and cis["max"][0] <= 3.0 <= cis["max"][1]
    # A given estimate is used when it agrees with the statistic on the sample ...
    same = bootstrap_cis({"max": largest}, x.size, n_boot=200, rng=np.random.default_rng(0), estimates={"max": 3.0})
    assert same == cis
    # ... and is refused when it does not: the interval would describe another number.
    with pytest.raises(ValueError, match=r"estimate of 'max' is 2.5, but the statistic on the sample itself gives 3.0"):
        bootstrap_cis({"max": largest}, x.size, n_boot=20, rng=np.random.default_rng(0), estimates={"max": 2.5})
    # Bounds, for all statistics or per name.
    mean = {"mean": lambda idx: x[idx].mean(axis=1), "max": largest}
    cut = bootstrap_cis(mean, x.size, n_boot=200, rng=np.random.default_rng(1), bounds={"mean": (0.5, 1.0)})
    assert cut["mean"] is not None and 0.5 <= cut["mean"][0] <= 0.8 <= cut["mean"][1] <= 1.0
    assert cut["max"] is not None and cut["max"][1] >= 3.0


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=2, max_size=40),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_interval_of_the_mean_is_ordered_and_within_the_data(values: list[float], seed: int) -> None:
    x = np.asarray(values)
    mean = float(x.mean())
    interval = bootstrap_ci(
        lambda idx: x[idx].mean(axis=1),
        x,
        n_boot=50,
        rng=np.random.default_rng(seed),
        batched=True,
        estimate=mean,
        bounds=(float(x.min()), float(x.max())),
    )
    assert interval is not None
    lo, hi = interval
    assert lo <= mean <= hi
    # The mean of equal values can round past them; the interval then ends at the mean.
    tolerance = 1e-9 * (1.0 + np.abs(x).max())
    assert x.min() - tolerance <= lo and hi <= x.max() + tolerance


# --------------------------------------------------------------------------------------------
# Resamples as row multiplicities, and the AUROC computed from them


def sklearn_auroc_per_resample(scores: np.ndarray, positive: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """scikit-learn's AUROC of every resample ``scores[idx[b]]``; NaN where one class is missing."""
    # scikit-learn refuses infinite scores; the AUROC only sees their order and ties, which the
    # dense ranks keep (-inf becomes the lowest rank).
    ranks = np.unique(scores, return_inverse=True)[1].astype(float)
    out = np.full(idx.shape[0], np.nan)
    for b, row in enumerate(idx):
        if positive[row].all() or not positive[row].any():
            continue
        out[b] = roc_auc_score(positive[row], ranks[row])
    return out


def test_resample_counts_hand_computed() -> None:
    idx = np.array([[0, 0, 2], [1, 2, 3], [3, 3, 3]])
    expected = [[2, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 3]]
    np.testing.assert_array_equal(resample_counts(idx, 4), expected)
    # Resamples of another length than n; no resamples; no rows.
    np.testing.assert_array_equal(resample_counts(np.array([[4, 4]]), 5), [[0, 0, 0, 0, 2]])
    assert resample_counts(np.empty((0, 3), dtype=np.intp), 3).shape == (0, 3)
    assert resample_counts(np.empty((2, 0), dtype=np.intp), 0).shape == (2, 0)


def test_resample_counts_equal_a_bincount_per_resample() -> None:
    strata = np.r_[np.zeros(7, dtype=int), np.ones(11, dtype=int)]
    idx = bootstrap_indices(strata.size, n_boot=300, rng=np.random.default_rng(0), strata=strata)
    counts = resample_counts(idx, strata.size)
    assert counts.shape == (300, 18)
    assert np.issubdtype(counts.dtype, np.integer)
    for row, count in zip(idx, counts, strict=True):
        np.testing.assert_array_equal(count, np.bincount(row, minlength=18))
    # Stratified resamples keep the stratum sizes.
    np.testing.assert_array_equal(counts[:, :7].sum(axis=1), 7)
    np.testing.assert_array_equal(counts[:, 7:].sum(axis=1), 11)


def test_resample_counts_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"idx must hold row indices in \[0, 3\), got 3"):
        resample_counts(np.array([[0, 3]]), 3)
    with pytest.raises(ValueError, match=r"idx must hold row indices in \[0, 3\), got -1"):
        resample_counts(np.array([[-1, 0]]), 3)
    with pytest.raises(ValueError, match="2-D integer index matrix, got shape \\(3,\\)"):
        resample_counts(np.array([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="dtype float64"):
        resample_counts(np.zeros((2, 2)), 3)


def test_auroc_from_counts_hand_computed() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    positive = np.array([False, False, True, True, True])
    idx = np.array([[0, 1, 2, 3, 4], [0, 0, 3, 3, 3], [2, 1, 1, 3, 3], [4, 1, 0, 4, 4], [0, 1, 1, 0, 1]])
    # Row 0: 0.35 beats 0.1; 0.8 beats both; 0.4 beats 0.1 and ties 0.4: (1 + 2 + 1.5) / 6.
    # Row 2: 0.35 loses to both 0.4, each 0.8 beats both: 4 / 6. Row 3: three 0.4 against 0.4
    # and 0.1, each scores 1.5 of 2. Row 4: no positive.
    expected = [4.5 / 6, 1.0, 4 / 6, 0.75, np.nan]
    got = auroc_from_counts(scores, positive, resample_counts(idx, 5))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_from_counts_equals_sklearn_per_resample(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    if seed % 2:  # heavy ties, -inf included
        scores = rng.integers(-1, 3, n).astype(float)
        scores[scores == -1] = -np.inf
    else:
        scores = rng.normal(size=n)
        scores[rng.random(n) < 0.2] = -np.inf
    positive = rng.random(n) < 0.4
    positive[:2] = [True, False]
    # Unstratified resamples: some miss a class (NaN expected, sklearn refuses them).
    idx = bootstrap_indices(n, n_boot=200, rng=rng)
    got = auroc_from_counts(scores, positive, resample_counts(idx, n))
    np.testing.assert_allclose(got, sklearn_auroc_per_resample(scores, positive, idx), rtol=0, atol=1e-12)


def test_auroc_from_counts_two_rows_and_single_class_resamples() -> None:
    scores, positive = np.array([-np.inf, 1.0]), np.array([True, False])
    idx = np.array([[0, 1], [1, 0], [0, 0], [1, 1]])
    got = auroc_from_counts(scores, positive, resample_counts(idx, 2))
    np.testing.assert_array_equal(got, [0.0, 0.0, np.nan, np.nan])
    np.testing.assert_array_equal(auroc_from_counts(np.array([2.0, 2.0]), np.array([True, False]), [[1, 3]]), [0.5])
    # One class only, or no rows: every resample is undefined.
    assert np.isnan(auroc_from_counts(np.array([1.0, 2.0]), np.array([True, True]), [[1, 1]])).all()
    assert auroc_from_counts(np.empty(0), np.empty(0, dtype=bool), np.empty((3, 0), dtype=np.intp)).shape == (3,)


def test_auroc_from_counts_reject_bad_input() -> None:
    positive = np.array([True, False])
    with pytest.raises(ValueError, match="1 NaN"):
        auroc_from_counts(np.array([np.nan, 1.0]), positive, [[1, 1]])
    with pytest.raises(ValueError, match="boolean mask of shape \\(2,\\)"):
        auroc_from_counts(np.array([0.0, 1.0]), np.array([1, 0]), [[1, 1]])
    with pytest.raises(ValueError, match=r"counts must have shape \(B, 2\), got \(1, 3\)"):
        auroc_from_counts(np.array([0.0, 1.0]), positive, [[1, 1, 1]])
    with pytest.raises(ValueError, match="non-negative integers"):
        auroc_from_counts(np.array([0.0, 1.0]), positive, [[1, -1]])
    with pytest.raises(ValueError, match="non-negative integers"):
        auroc_from_counts(np.array([0.0, 1.0]), positive, [[1.0, 1.0]])


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 1.0, np.inf]), st.booleans()), min_size=2, max_size=20
    ),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_auroc_from_counts_property(rows: list[tuple[float, bool]], seed: int) -> None:
    scores = np.array([score for score, _ in rows])
    positive = np.array([label for _, label in rows])
    idx = bootstrap_indices(scores.size, n_boot=20, rng=np.random.default_rng(seed))
    got = auroc_from_counts(scores, positive, resample_counts(idx, scores.size))
    np.testing.assert_allclose(got, sklearn_auroc_per_resample(scores, positive, idx), rtol=0, atol=1e-12)
    defined = got[np.isfinite(got)]
    assert ((defined >= 0.0) & (defined <= 1.0)).all()
    # Swapping the classes and negating the scores leaves the AUROC unchanged.
    swapped = auroc_from_counts(-scores, ~positive, resample_counts(idx, scores.size))
    np.testing.assert_allclose(swapped, got, rtol=0, atol=1e-12)
