"""The drift statistic: MMD² near zero for one distribution, large for a shifted one, with a
permutation p-value that tells them apart."""

from __future__ import annotations

import numpy as np
import pytest

from transferkit.drift import mmd_test, sample_rows


def test_one_distribution_gives_near_zero_and_a_large_p_value() -> None:
    rng = np.random.default_rng(0)
    result = mmd_test(rng.normal(size=(300, 8)), rng.normal(size=(200, 8)))
    assert abs(result.mmd2) < 0.01
    assert result.p_value > 0.05
    assert (result.reference_rows, result.recent_rows) == (300, 200)


def test_a_shift_gives_a_large_statistic_and_a_small_p_value() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(300, 8))
    small = mmd_test(reference, rng.normal(loc=0.3, size=(200, 8)))
    large = mmd_test(reference, rng.normal(loc=1.0, size=(200, 8)))
    assert large.mmd2 > small.mmd2 > 0.01
    assert large.p_value == pytest.approx(1 / 201)  # no permutation reaches it
    assert small.p_value < 0.05


def test_the_statistic_is_symmetric_and_seeded() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 4)), rng.normal(loc=0.5, size=(60, 4))
    assert mmd_test(x, y).mmd2 == pytest.approx(mmd_test(y, x).mmd2)
    assert mmd_test(x, y) == mmd_test(x, y)


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="widths differ: 4 vs 3"):
        mmd_test(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least two rows"):
        mmd_test(np.zeros((1, 4)), np.zeros((5, 4)))


def test_sample_rows_is_a_seeded_sorted_subset() -> None:
    rows = sample_rows(10_000, 1000)
    assert len(rows) == 1000
    assert np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, sample_rows(10_000, 1000))
    assert np.array_equal(sample_rows(30, 1000), np.arange(30))
