"""Training and evaluation round trip on a small sample; the metrics contract."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from src import evaluate, schema, train
from src.files import read_json

RATES = ("accuracy", "precision", "recall", "f1", "roc_auc")


@pytest.fixture(scope="module")
def metrics_file(project: Path) -> Path:
    out = project / "build" / "metrics.json"
    assert evaluate.main(["--data", str(project / "build/data"), "--model",
                          str(project / "build/model"), "--out", str(out)]) == 0
    return out


def test_metrics_are_rates_in_unit_interval(metrics_file: Path, project: Path) -> None:
    metrics = read_json(metrics_file)
    for name in RATES:
        assert 0.0 <= metrics[name] <= 1.0, name
    test_rows = len(schema.load(project / "build/data/test.csv"))
    assert metrics["n_test"] == test_rows


def test_metrics_file_is_a_flat_object_of_numbers(metrics_file: Path) -> None:
    metrics = json.loads(metrics_file.read_text())
    assert isinstance(metrics, dict) and metrics
    for name, value in metrics.items():
        assert isinstance(name, str)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), name
        assert math.isfinite(value), name
    assert set(RATES) | {"n_test"} <= set(metrics)


def test_model_files_describe_the_model(project: Path) -> None:
    meta = read_json(project / "build/model/model.json")
    assert tuple(meta["features"]) == schema.FEATURES
    assert 0.0 < meta["threshold"] < 1.0
    assert re.fullmatch(r"(local|run[\w.-]+)-[0-9a-f]{12}", meta["version"])
    assert meta["demo_fault"] is None
    with open(project / "build/model/model.pkl", "rb") as handle:
        model = pickle.load(handle)
    x, _ = schema.split_xy(schema.load(project / "build/data/test.csv"))
    scores = model.predict_proba(x)[:, 1]
    assert scores.shape == (len(x),) and ((scores >= 0) & (scores <= 1)).all()


def test_training_is_deterministic_and_the_demo_fault_marks_only_metadata(
    project: Path, tmp_path: Path
) -> None:
    """Retraining gives the same bytes; the fault flag changes model.json and the version only."""
    meta = train.train(project / "build/data", tmp_path, folds=3, demo_fault="invert")
    clean = read_json(project / "build/model/model.json")
    assert (tmp_path / "model.pkl").read_bytes() == (project / "build/model/model.pkl").read_bytes()
    assert meta["demo_fault"] == "invert" and clean["demo_fault"] is None
    assert meta["version"] != clean["version"]
    differing = {k for k in meta if meta[k] != clean[k]}
    assert differing == {"demo_fault", "version"}


def test_the_logistic_alternative_trains(project: Path, tmp_path: Path) -> None:
    meta = train.train(project / "build/data", tmp_path, kind="logreg", folds=3)
    assert meta["estimator"] == "LogisticRegression"
    metrics, _ = evaluate.evaluate(project / "build/data", tmp_path, tmp_path / "m.json")
    assert 0.0 <= metrics["recall"] <= 1.0


def test_compute_metrics_on_a_known_case() -> None:
    y = np.array([0, 0, 1, 1])
    metrics = evaluate.compute_metrics(y, np.array([0.1, 0.6, 0.4, 0.9]), 0.5)
    assert metrics["accuracy"] == metrics["precision"] == metrics["recall"] == 0.5
    assert metrics["roc_auc"] == 0.75
    assert metrics["baseline_accuracy"] == 0.5


def test_compute_metrics_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both"):
        evaluate.compute_metrics(np.array([0, 0]), np.array([0.2, 0.7]), 0.5)


def test_evaluate_rejects_a_model_with_other_features(project: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(project / "build/model", model_dir)
    meta = read_json(model_dir / "model.json")
    meta["features"] = meta["features"][:-1]
    (model_dir / "model.json").write_text(json.dumps(meta))
    assert evaluate.main(["--data", str(project / "build/data"), "--model", str(model_dir),
                          "--out", str(tmp_path / "m.json")]) == 2
    assert not (tmp_path / "m.json").exists()


def test_cross_validated_metrics_are_written_for_the_sweep(project: Path) -> None:
    """cv-metrics.json: the flat numbers the best-of gate picks a sweep cell by."""
    cv = read_json(project / "build/model/cv-metrics.json")
    meta = read_json(project / "build/model/model.json")
    assert cv == {f"cv_{k}": v for k, v in meta["cross_validated"].items()}
    assert set(cv) == {"cv_roc_auc", "cv_precision", "cv_recall"}


def test_the_class_weight_changes_the_model(project: Path, tmp_path: Path) -> None:
    meta = train.train(project / "build/data", tmp_path, folds=3, class_weight="1")
    balanced = read_json(project / "build/model/model.json")
    assert meta["class_weight"] == "1" and balanced["class_weight"] == "balanced"
    assert balanced["params"]["class_weight"] == "balanced"
    assert (tmp_path / "model.pkl").read_bytes() != (project / "build/model/model.pkl").read_bytes()


@pytest.mark.parametrize("text", ["heavy", "0", "-3", "nan", "5000"])
def test_a_bad_class_weight_is_refused(project: Path, tmp_path: Path, text: str) -> None:
    assert train.main(["--data", str(project / "build/data"), "--out", str(tmp_path),
                       "--class-weight", text]) == 2
    assert not (tmp_path / "model.pkl").exists()


def test_class_weights_parse() -> None:
    assert train.parse_class_weight("Balanced") == "balanced"
    assert train.parse_class_weight("none") is None
    assert train.parse_class_weight("5") == {0: 1.0, 1: 5.0}
