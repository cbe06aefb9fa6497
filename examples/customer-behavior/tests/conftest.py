"""Shared fixtures: the committed raw data, a small stratified sample of it and
a model trained on that sample (so the whole suite stays fast)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from src.prepare import prepare
from src.train import train

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw" / "caravan.csv"


@pytest.fixture(scope="session")
def raw_frame() -> pd.DataFrame:
    """The full committed data set."""
    return pd.read_csv(RAW)


@pytest.fixture(scope="session")
def sample_csv(tmp_path_factory: pytest.TempPathFactory, raw_frame: pd.DataFrame) -> Path:
    """400 real customers (40 buyers), shuffled, in the raw file's format."""
    buyers = raw_frame[raw_frame["Purchase"] == "Yes"].sample(40, random_state=0)
    others = raw_frame[raw_frame["Purchase"] == "No"].sample(360, random_state=0)
    frame = pd.concat([buyers, others]).sample(frac=1.0, random_state=0)
    path = tmp_path_factory.mktemp("sample") / "caravan-sample.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory, sample_csv: Path) -> Path:
    """A project directory with build/data and build/model made from the sample."""
    root = tmp_path_factory.mktemp("project")
    prepare(sample_csv, root / "build" / "data")
    train(root / "build" / "data", root / "build" / "model", folds=3)
    return root
