"""Schema validation accepts the real data and rejects malformed input clearly."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from src import prepare, schema
from tests.conftest import RAW


def test_the_committed_data_is_valid() -> None:
    frame = schema.load(RAW)
    assert frame.shape[1] == 86 and len(frame) > 1000


def _drop_column(f: pd.DataFrame) -> pd.DataFrame:
    return f.drop(columns="MOSTYPE")


def _extra_column(f: pd.DataFrame) -> pd.DataFrame:
    return f.assign(EXTRA=1)


def _renamed_column(f: pd.DataFrame) -> pd.DataFrame:
    return f.rename(columns={"MAANTHUI": "maanthui"})


def _swapped_columns(f: pd.DataFrame) -> pd.DataFrame:
    cols = list(f.columns)
    cols[0], cols[1] = cols[1], cols[0]
    return f[cols]


def _bad_label(f: pd.DataFrame) -> pd.DataFrame:
    f = f.copy()
    f.loc[f.index[0], "Purchase"] = "Maybe"
    return f


def _missing_value(f: pd.DataFrame) -> pd.DataFrame:
    f = f.copy()
    f["PPERSAUT"] = f["PPERSAUT"].astype(float)
    f.loc[f.index[3], "PPERSAUT"] = np.nan
    return f


def _negative_value(f: pd.DataFrame) -> pd.DataFrame:
    f = f.copy()
    f.loc[f.index[2], "MOSTYPE"] = -1
    return f


def _fractional_value(f: pd.DataFrame) -> pd.DataFrame:
    f = f.copy()
    f["MGEMOMV"] = f["MGEMOMV"].astype(float)
    f.loc[f.index[1], "MGEMOMV"] = 1.5
    return f


def _one_class(f: pd.DataFrame) -> pd.DataFrame:
    return f[f["Purchase"] == "No"]


def _no_rows(f: pd.DataFrame) -> pd.DataFrame:
    return f.iloc[0:0]


CORRUPTIONS: dict[str, tuple[Callable[[pd.DataFrame], pd.DataFrame], str]] = {
    "dropped column": (_drop_column, "expected 86 columns"),
    "extra column": (_extra_column, "expected 86 columns"),
    "renamed column": (_renamed_column, "column 2 is 'maanthui'"),
    "swapped columns": (_swapped_columns, "column 1 is 'MAANTHUI'"),
    "unknown label": (_bad_label, "Purchase must be Yes/No"),
    "missing value": (_missing_value, "missing values"),
    "negative value": (_negative_value, "negative"),
    "fractional value": (_fractional_value, "not integer"),
    "one class only": (_one_class, "both classes"),
    "no rows": (_no_rows, "no rows"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_input_is_rejected_with_a_reason(
    name: str, raw_frame: pd.DataFrame, tmp_path: Path
) -> None:
    corrupt, reason = CORRUPTIONS[name]
    path = tmp_path / "bad.csv"
    corrupt(raw_frame.head(200)).to_csv(path, index=False)
    with pytest.raises(schema.SchemaError, match=reason):
        schema.load(path)


@pytest.mark.parametrize("content", ["", "not,a\ncsv\"file,,\n\"\n"])
def test_unreadable_files_are_schema_errors(content: str, tmp_path: Path) -> None:
    path = tmp_path / "junk.csv"
    path.write_text(content)
    with pytest.raises(schema.SchemaError):
        schema.load(path)


def test_prepare_fails_cleanly_and_writes_nothing(
    raw_frame: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.csv"
    _bad_label(raw_frame.head(50)).to_csv(bad, index=False)
    out = tmp_path / "out"
    assert prepare.main(["--raw", str(bad), "--out", str(out)]) == 2
    assert "invalid input" in capsys.readouterr().err
    assert not out.exists()
