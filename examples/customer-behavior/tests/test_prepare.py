"""The split is stratified, complete, deterministic, and described by its manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from src import schema
from src.files import read_json
from src.prepare import prepare
from tests.conftest import RAW, ROOT


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split")
    prepare(RAW, out)
    return out


def test_split_is_stratified(split_dir: Path, raw_frame: pd.DataFrame) -> None:
    overall = (raw_frame["Purchase"] == "Yes").mean()
    for name in ("train.csv", "test.csv"):
        frame = schema.load(split_dir / name)
        share = (frame["Purchase"] == "Yes").mean()
        # Stratified: off by at most one buyer from the exact share.
        assert abs(share - overall) <= 1 / len(frame), (name, share, overall)


def test_split_is_complete_and_disjoint(split_dir: Path, raw_frame: pd.DataFrame) -> None:
    train = pd.read_csv(split_dir / "train.csv")
    test = pd.read_csv(split_dir / "test.csv")
    assert len(test) == pytest.approx(0.25 * len(raw_frame), abs=1)
    both = pd.concat([train, test]).sort_values(list(raw_frame.columns)).reset_index(drop=True)
    original = raw_frame.sort_values(list(raw_frame.columns)).reset_index(drop=True)
    pd.testing.assert_frame_equal(both, original)


def test_split_is_deterministic(split_dir: Path, tmp_path: Path) -> None:
    prepare(RAW, tmp_path)
    for name in ("train.csv", "test.csv", "manifest.json"):
        assert (tmp_path / name).read_bytes() == (split_dir / name).read_bytes(), name


def test_another_seed_gives_another_split(split_dir: Path, tmp_path: Path) -> None:
    prepare(RAW, tmp_path, seed=8)
    assert (tmp_path / "test.csv").read_bytes() != (split_dir / "test.csv").read_bytes()


def test_manifest_describes_the_input(split_dir: Path, raw_frame: pd.DataFrame) -> None:
    manifest = read_json(split_dir / "manifest.json")
    buyers = int((raw_frame["Purchase"] == "Yes").sum())
    assert (manifest["rows"], manifest["positives"]) == (len(raw_frame), buyers)
    assert manifest["train"]["rows"] + manifest["test"]["rows"] == len(raw_frame)
    assert manifest["train"]["positives"] + manifest["test"]["positives"] == buyers
    assert manifest["sha256"] == hashlib.sha256(RAW.read_bytes()).hexdigest()
    assert manifest["features"] == 85


def test_the_pipeline_split_matches_when_present() -> None:
    """In the `unit-tests` stage, build/data is the artifact of `prepare`: check it."""
    built = ROOT / "build" / "data"
    if not (built / "manifest.json").exists():
        pytest.skip("no build/data here (it comes from the prepare stage)")
    manifest = read_json(built / "manifest.json")
    assert manifest["sha256"] == hashlib.sha256(RAW.read_bytes()).hexdigest()
    for name in ("train.csv", "test.csv"):
        schema.load(built / name)
