"""src/drift.py, property-based: the PSI and the sliding window hold for any
inputs hypothesis can think of, not only the hand-picked ones in test_drift.

hypothesis comes from requirements-test.txt (PyPI), not from the image."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from src import drift

# Shared machines: no per-example deadline; the same examples every run, so
# a failure reproduces; no example database written into the checkout.
settings.register_profile(
    "kiln",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("kiln")

FEATURES = ["a", "b"]
codes = st.integers(min_value=0, max_value=9).map(float)
row = st.lists(codes, min_size=2, max_size=2)
rows = st.lists(row, min_size=1, max_size=300)


@given(reference_rows=rows, observed_rows=rows)
def test_psi_is_never_negative(reference_rows, observed_rows) -> None:
    expected = drift.reference(reference_rows, FEATURES)
    for column, name in enumerate(FEATURES):
        observed = Counter(drift._key(r[column]) for r in observed_rows)
        assert drift.psi(expected[name], observed, len(observed_rows)) >= 0.0


@given(reference_rows=rows)
def test_the_training_rows_themselves_do_not_drift(reference_rows) -> None:
    expected = drift.reference(reference_rows, FEATURES)
    window = drift.DriftWindow(FEATURES, size=len(reference_rows), min_rows=1)
    window.add(reference_rows)
    value, _ = window.worst(expected)
    assert value < 1e-9


@given(
    batches=st.lists(rows, min_size=1, max_size=6),
    size=st.integers(min_value=1, max_value=200),
)
def test_the_window_holds_exactly_the_last_size_rows(batches, size) -> None:
    window = drift.DriftWindow(FEATURES, size=size, min_rows=1)
    everything = []
    for batch in batches:
        window.add(batch)
        everything.extend(batch)
    last = everything[-size:]
    assert len(window) == len(last)
    # Its running counts are what a recount of those rows gives, so its PSI
    # against any reference equals a fresh window's over the same rows.
    expected = drift.reference(everything, FEATURES)
    fresh = drift.DriftWindow(FEATURES, size=size, min_rows=1)
    fresh.add(last)
    assert window.worst(expected) == fresh.worst(expected)
