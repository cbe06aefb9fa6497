"""The Caravan data schema and the checks every stage applies to its input.

The raw file, the train/test splits and the rows the server scores all share
one shape: 85 integer attributes (socio-demographic codes and product
ownership counts, all small non-negative integers) followed by ``Purchase``,
``Yes`` for a caravan policy buyer and ``No`` otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

TARGET = "Purchase"
POSITIVE = "Yes"
NEGATIVE = "No"

# The 85 attributes, in file order (CoIL Challenge 2000 names).
FEATURES: tuple[str, ...] = (
    "MOSTYPE", "MAANTHUI", "MGEMOMV", "MGEMLEEF", "MOSHOOFD", "MGODRK", "MGODPR",
    "MGODOV", "MGODGE", "MRELGE", "MRELSA", "MRELOV", "MFALLEEN", "MFGEKIND",
    "MFWEKIND", "MOPLHOOG", "MOPLMIDD", "MOPLLAAG", "MBERHOOG", "MBERZELF",
    "MBERBOER", "MBERMIDD", "MBERARBG", "MBERARBO", "MSKA", "MSKB1", "MSKB2",
    "MSKC", "MSKD", "MHHUUR", "MHKOOP", "MAUT1", "MAUT2", "MAUT0", "MZFONDS",
    "MZPART", "MINKM30", "MINK3045", "MINK4575", "MINK7512", "MINK123M",
    "MINKGEM", "MKOOPKLA", "PWAPART", "PWABEDR", "PWALAND", "PPERSAUT",
    "PBESAUT", "PMOTSCO", "PVRAAUT", "PAANHANG", "PTRACTOR", "PWERKT", "PBROM",
    "PLEVEN", "PPERSONG", "PGEZONG", "PWAOREG", "PBRAND", "PZEILPL", "PPLEZIER",
    "PFIETS", "PINBOED", "PBYSTAND", "AWAPART", "AWABEDR", "AWALAND",
    "APERSAUT", "ABESAUT", "AMOTSCO", "AVRAAUT", "AAANHANG", "ATRACTOR",
    "AWERKT", "ABROM", "ALEVEN", "APERSONG", "AGEZONG", "AWAOREG", "ABRAND",
    "AZEILPL", "APLEZIER", "AFIETS", "AINBOED", "ABYSTAND",
)
COLUMNS: tuple[str, ...] = FEATURES + (TARGET,)


class SchemaError(ValueError):
    """The data does not have the Caravan shape; the message says how."""


def validate(frame: pd.DataFrame, source: str = "data") -> None:
    """Raise :class:`SchemaError` unless ``frame`` has the Caravan schema.

    Checks the exact column names and order, that there are rows, that every
    attribute is a non-negative integer with no missing values, and that
    ``Purchase`` holds only ``Yes``/``No`` with both classes present.
    """
    columns = tuple(str(c) for c in frame.columns)
    if len(columns) != len(COLUMNS):
        raise SchemaError(
            f"{source}: expected {len(COLUMNS)} columns (85 attributes + {TARGET}), "
            f"found {len(columns)}"
        )
    if columns != COLUMNS:
        i, got, want = next(
            (i, got, want)
            for i, (got, want) in enumerate(zip(columns, COLUMNS, strict=True))
            if got != want
        )
        raise SchemaError(f"{source}: column {i + 1} is {got!r}, expected {want!r}")
    if frame.empty:
        raise SchemaError(f"{source}: no rows")
    missing = frame.isna().sum()
    if missing.any():
        name = str(missing[missing > 0].index[0])
        raise SchemaError(f"{source}: {int(missing.sum())} missing values (first in {name})")
    for name in FEATURES:
        column = frame[name]
        if not pd.api.types.is_integer_dtype(column):
            raise SchemaError(f"{source}: attribute {name} is not integer ({column.dtype})")
        if (column < 0).any():
            raise SchemaError(f"{source}: attribute {name} has negative values")
    labels = set(frame[TARGET].unique())
    unknown = labels - {POSITIVE, NEGATIVE}
    if unknown:
        raise SchemaError(f"{source}: {TARGET} must be Yes/No, found {sorted(map(str, unknown))}")
    if labels != {POSITIVE, NEGATIVE}:
        raise SchemaError(f"{source}: {TARGET} has only {sorted(labels)}; both classes are needed")


def load(path: Path | str) -> pd.DataFrame:
    """Read a Caravan CSV and validate it; errors name the file."""
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise SchemaError(f"{path}: cannot read CSV: {err}") from err
    validate(frame, str(path))
    return frame


def split_xy(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Attributes and the 0/1 target (1 = bought a caravan policy)."""
    return frame.loc[:, list(FEATURES)], (frame[TARGET] == POSITIVE).astype(int)

