"""Stage `evaluate`: score the held-out test set and write the gate's metrics.

    python -m src.evaluate --data build/data --model build/model --out build/metrics.json

The metrics file is one flat JSON object of numbers (the coordinator reads it
for the acceptance gate): accuracy, precision, recall, f1 and roc_auc with the
buyers as the positive class, plus n_test, n_test_positives, threshold and
baseline_accuracy (what always answering "No" would score).
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from src import schema
from src.files import read_json, write_json


def load_model(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The pickled pipeline and its metadata; the features must be the schema's."""
    with open(model_dir / "model.pkl", "rb") as handle:
        model = pickle.load(handle)
    meta = read_json(model_dir / "model.json")
    if tuple(meta.get("features", ())) != schema.FEATURES:
        raise ValueError(f"{model_dir}/model.json: features differ from the Caravan schema")
    return model, meta


def compute_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Flat metrics of buyer scores at ``threshold`` (positive class = buyers)."""
    y_true = np.asarray(y_true).astype(int)
    predicted = (np.asarray(scores) >= threshold).astype(int)
    if len(set(y_true.tolist())) < 2:
        raise ValueError("the test set needs both buyers and non-buyers")
    return {
        "accuracy": float(accuracy_score(y_true, predicted)),
        "precision": float(precision_score(y_true, predicted, zero_division=0)),
        "recall": float(recall_score(y_true, predicted, zero_division=0)),
        "f1": float(f1_score(y_true, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(y_true, scores)),
        "n_test": float(len(y_true)),
        "n_test_positives": float(y_true.sum()),
        "threshold": float(threshold),
        "baseline_accuracy": float(1.0 - y_true.mean()),
    }


def evaluate(data: Path, model_dir: Path, out: Path) -> tuple[dict[str, float], dict[str, int]]:
    """Score ``data/test.csv`` with the model in ``model_dir``; write the metrics.

    Returns the metrics as written and the confusion counts (tp, fp, tn, fn).
    """
    frame = schema.load(data / "test.csv")
    x, y = schema.split_xy(frame)
    model, meta = load_model(model_dir)
    scores = model.predict_proba(x)[:, 1]
    threshold = float(meta["threshold"])
    metrics = compute_metrics(y.to_numpy(), scores, threshold)
    rounded = {k: round(v, 6) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in rounded.values()):
        raise ValueError(f"non-finite metric in {rounded}")
    write_json(out, rounded)
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y.to_numpy(), predicted, labels=[0, 1]).ravel()
    return rounded, {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)}


def report(metrics: dict[str, float], confusion: dict[str, int]) -> str:
    """A short human-readable report."""
    return "\n".join(
        [
            f"evaluate: {int(metrics['n_test'])} test customers, "
            f"{int(metrics['n_test_positives'])} buyers, threshold {metrics['threshold']:.4f}",
            f"evaluate: flagged as buyers: {confusion['tp']} right, {confusion['fp']} wrong; "
            f"not flagged: {confusion['tn']} right, {confusion['fn']} missed buyers",
            f"evaluate: accuracy {metrics['accuracy']:.4f} "
            f"(always-No baseline {metrics['baseline_accuracy']:.4f})",
            f"evaluate: precision {metrics['precision']:.4f}  recall {metrics['recall']:.4f}  "
            f"f1 {metrics['f1']:.4f}  roc_auc {metrics['roc_auc']:.4f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("build/data"))
    parser.add_argument("--model", type=Path, default=Path("build/model"))
    parser.add_argument("--out", type=Path, default=Path("build/metrics.json"))
    args = parser.parse_args(argv)
    try:
        metrics, confusion = evaluate(args.data, args.model, args.out)
    except (schema.SchemaError, ValueError, OSError) as err:
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    print(report(metrics, confusion))
    print(f"evaluate: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
