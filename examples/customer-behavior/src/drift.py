"""Input drift: how far the customers a server scores are from the training data.

Every Caravan attribute is a small non-negative integer code, so a feature's
distribution is the share of each value. ``reference`` records those shares
for the training rows (``train`` stores them in ``model.json``); a server
keeps the last ``size`` rows it scored in a :class:`DriftWindow` and reports
the population stability index (PSI) of each feature against the reference:

    PSI = sum over values v of (observed(v) - expected(v)) * ln(observed(v) / expected(v))

with shares floored at ``EPSILON`` so a value never seen on one side counts
as rare rather than infinite. Values the training data never had share one
"other" bucket. The server exports the largest feature PSI: by the usual rule
of thumb under 0.1 is stable, 0.1-0.25 a shift worth a look, over 0.25 a
population the model was not trained on. Stdlib only.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from typing import Optional, Sequence

EPSILON = 1e-4
OTHER = "other"


def _key(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def reference(rows: Sequence[Sequence[float]], features: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each feature's share of each value over ``rows`` (training data)."""
    if not rows:
        raise ValueError("no rows to take a reference distribution from")
    shares = {}
    for column, name in enumerate(features):
        counts = Counter(_key(row[column]) for row in rows)
        shares[name] = {value: count / len(rows) for value, count in sorted(counts.items())}
    return shares


def psi(expected: dict[str, float], observed: Counter, total: int) -> float:
    """The PSI of ``observed`` counts (of ``total`` rows) against ``expected`` shares."""
    buckets = set(expected) | {OTHER}
    seen = Counter()
    for value, count in observed.items():
        seen[value if value in expected else OTHER] += count
    value = 0.0
    for bucket in buckets:
        e = max(expected.get(bucket, 0.0), EPSILON)
        o = max(seen.get(bucket, 0) / total, EPSILON)
        value += (o - e) * math.log(o / e)
    return value


class DriftWindow:
    """The last ``size`` scored rows, as running value counts per feature."""

    def __init__(self, features: Sequence[str], size: int = 500, min_rows: int = 100) -> None:
        if size < 1 or not 1 <= min_rows <= size:
            raise ValueError("need 1 <= min_rows <= size")
        self.features = list(features)
        self.size = size
        self.min_rows = min_rows
        self._rows: deque = deque()
        self._counts = [Counter() for _ in self.features]
        self._lock = threading.Lock()

    def add(self, rows: Sequence[Sequence[float]]) -> None:
        """Record scored rows (each in ``features`` order)."""
        with self._lock:
            for row in rows:
                keys = [_key(v) for v in row]
                self._rows.append(keys)
                for counts, key in zip(self._counts, keys, strict=True):
                    counts[key] += 1
                if len(self._rows) > self.size:
                    for counts, key in zip(self._counts, self._rows.popleft(), strict=True):
                        counts[key] -= 1
                        if not counts[key]:
                            del counts[key]

    def __len__(self) -> int:
        return len(self._rows)

    def worst(self, expected: dict[str, dict[str, float]]) -> Optional[tuple[float, str]]:
        """The largest feature PSI against ``expected`` and its feature; ``None``
        until the window holds ``min_rows`` rows."""
        with self._lock:
            total = len(self._rows)
            if total < self.min_rows:
                return None
            scores = [
                (psi(expected[name], counts, total), name)
                for name, counts in zip(self.features, self._counts, strict=True)
                if name in expected
            ]
        return max(scores) if scores else None
