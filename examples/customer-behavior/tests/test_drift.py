"""src/drift.py: the population stability index of scored inputs."""

from __future__ import annotations

import random

import pytest

from src import drift

FEATURES = ["a", "b"]


def rows(n: int, seed: int, shift: int = 0) -> list[list[float]]:
    rng = random.Random(seed)
    return [[float(rng.choice([1, 1, 2, 3]) + shift), float(rng.randint(0, 9))] for _ in range(n)]


def test_the_same_population_is_stable_and_a_shifted_one_is_not() -> None:
    expected = drift.reference(rows(5000, 1), FEATURES)
    assert expected["a"] == pytest.approx({"1": 0.5, "2": 0.25, "3": 0.25}, abs=0.03)
    window = drift.DriftWindow(FEATURES, size=500, min_rows=100)
    window.add(rows(99, 2))
    assert window.worst(expected) is None, "too few rows to judge"
    window.add(rows(401, 3))
    stable, _ = window.worst(expected)
    assert stable < 0.05
    # Values the training data never had fall into "other": a large PSI,
    # named after the feature that moved.
    window.add(rows(500, 4, shift=5))
    assert len(window) == 500, "the window slides"
    shifted, feature = window.worst(expected)
    assert shifted > 1.0 and feature == "a"


def test_psi_grows_with_the_share_of_shifted_rows() -> None:
    expected = drift.reference(rows(5000, 1), FEATURES)
    values = []
    for share in (0.0, 0.2, 0.6):
        window = drift.DriftWindow(FEATURES, size=1000, min_rows=10)
        clean = int(1000 * (1 - share))
        window.add(rows(clean, 5) + rows(1000 - clean, 6, shift=5))
        values.append(window.worst(expected)[0])
    assert values[0] < values[1] < values[2]
    assert values[1] > 0.25, "a fifth of the inputs unlike training is a real shift"


def test_bad_window_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        drift.DriftWindow(FEATURES, size=10, min_rows=11)
    with pytest.raises(ValueError):
        drift.reference([], FEATURES)
