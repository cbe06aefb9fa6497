"""Stage `train`: fit the buyer model and choose its decision threshold.

    python -m src.train --data build/data --out build/model

Writes ``model.pkl`` (a pickled scikit-learn ``Pipeline``; ``predict_proba``
gives the buyer probability) and ``model.json`` (features, threshold, version,
library versions, training rows). Only 6% of customers buy, so the model is
trained with balanced class weights and the threshold is set so that the model
flags a fixed share of customers (``--flag-rate``, default 10%): the cut-off is
that quantile of out-of-fold scores on the training set, never of the test set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import platform
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_score, recall_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from src import schema
from src import drift
from src.files import read_json, write_json

DEFAULT_SEED = 7
DEFAULT_FLAG_RATE = 0.10
DEFAULT_FOLDS = 5
MODELS = ("hgb", "logreg")
FAULTS = ("none", "invert")


def parse_class_weight(text: str) -> str | dict[int, float] | None:
    """``balanced``, ``none``, or a number: how much one buyer weighs against one non-buyer."""
    text = text.strip().lower()
    if text in ("balanced", "none"):
        return None if text == "none" else "balanced"
    try:
        weight = float(text)
    except ValueError:
        weight = -1.0
    if not 0.0 < weight < 1000.0:  # NaN fails too
        raise ValueError(
            f"class weight must be 'balanced', 'none' or a buyer weight in (0, 1000), got {text!r}"
        )
    return {0: 1.0, 1: weight}


def build_model(
    kind: str = "hgb",
    seed: int = DEFAULT_SEED,
    class_weight: str | dict[int, float] | None = "balanced",
) -> Pipeline:
    """The estimator: gradient-boosted trees (default) or a scaled logistic regression."""
    if kind == "hgb":
        classifier = HistGradientBoostingClassifier(
            max_iter=150,
            learning_rate=0.05,
            max_depth=3,
            l2_regularization=1.0,
            class_weight=class_weight,
            random_state=seed,
        )
        return Pipeline([("classifier", classifier)])
    if kind == "logreg":
        classifier = LogisticRegression(C=0.01, class_weight=class_weight, max_iter=2000)
        return Pipeline([("scale", StandardScaler()), ("classifier", classifier)])
    raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")


def choose_threshold(
    model: Pipeline,
    x: pd.DataFrame,
    y: pd.Series,
    flag_rate: float,
    folds: int = DEFAULT_FOLDS,
    seed: int = DEFAULT_SEED,
) -> tuple[float, dict[str, float]]:
    """Threshold that flags ``flag_rate`` of customers, from out-of-fold scores.

    Returns the threshold and the cross-validated scores it gives on the
    training set (roc_auc, precision, recall), for the record.
    """
    if not 0.0 < flag_rate < 1.0:
        raise ValueError(f"flag rate must be in (0, 1), got {flag_rate}")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    threshold = float(np.quantile(scores, 1.0 - flag_rate))
    flagged = (scores >= threshold).astype(int)
    cross_validated = {
        "roc_auc": float(roc_auc_score(y, scores)),
        "precision": float(precision_score(y, flagged, zero_division=0)),
        "recall": float(recall_score(y, flagged, zero_division=0)),
    }
    return threshold, cross_validated


def run_label() -> str:
    """``run<KILN_RUN_ID>`` inside Kiln, ``local`` elsewhere (safe as a directory name)."""
    run = re.sub(r"[^A-Za-z0-9._-]", "_", os.environ.get("KILN_RUN_ID", "").strip())
    return f"run{run}" if run else "local"


def train(
    data: Path,
    out: Path,
    kind: str = "hgb",
    flag_rate: float = DEFAULT_FLAG_RATE,
    seed: int = DEFAULT_SEED,
    folds: int = DEFAULT_FOLDS,
    demo_fault: str = "none",
    class_weight: str = "balanced",
) -> dict[str, Any]:
    """Train on ``data/train.csv`` and write ``model.pkl`` + ``model.json`` into ``out``."""
    if demo_fault not in FAULTS:
        raise ValueError(f"unknown demo fault {demo_fault!r}; choose one of {', '.join(FAULTS)}")
    frame = schema.load(data / "train.csv")
    x, y = schema.split_xy(frame)
    model = build_model(kind, seed, parse_class_weight(class_weight))
    # One OpenMP thread: the trees' histogram sums then add up in the same
    # order on every machine (bit-identical models whatever the core count),
    # and no spinning worker threads fight over a container's CPU quota.
    with threadpool_limits(limits=1, user_api="openmp"):
        threshold, cross_validated = choose_threshold(model, x, y, flag_rate, folds, seed)
        model.fit(x, y)

    blob = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    manifest_path = data / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {}
    meta: dict[str, Any] = {
        "model": kind,
        "estimator": type(model[-1]).__name__,
        "params": {k: v for k, v in sorted(model[-1].get_params().items()) if _plain(v)},
        "features": list(schema.FEATURES),
        "target": schema.TARGET,
        "positive_label": schema.POSITIVE,
        "threshold": threshold,
        "flag_rate": flag_rate,
        "class_weight": class_weight.strip().lower(),
        "cross_validated": cross_validated,
        "training_rows": int(len(frame)),
        "training_positives": int(y.sum()),
        "data_sha256": manifest.get("sha256"),
        "seed": seed,
        "run": run_label(),
        "demo_fault": None if demo_fault == "none" else demo_fault,
        # What serve.py measures input drift against (src/drift.py).
        "reference": drift.reference(x.to_numpy().tolist(), schema.FEATURES),
        "versions": {
            "python": platform.python_version(),
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
    }
    # The version names the exact model: the run that trained it plus a digest
    # of the pickled estimator and its metadata (so a fault flag changes it too).
    digest = hashlib.sha256(blob + json.dumps(meta, sort_keys=True).encode()).hexdigest()
    meta["model_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["version"] = f"{meta['run']}-{digest[:12]}"

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.pkl.tmp"
    tmp.write_bytes(blob)
    os.replace(tmp, out / "model.pkl")
    write_json(out / "model.json", meta)
    # The sweep's best-of gate picks a cell by these (training-set
    # cross-validation: the held-out test set never chooses the model).
    write_json(out / "cv-metrics.json", {f"cv_{k}": v for k, v in cross_validated.items()})
    return meta


def _plain(value: Any) -> bool:
    """Whether a hyper-parameter is a plain JSON value worth recording."""
    return value is None or isinstance(value, (bool, int, float, str))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("build/data"))
    parser.add_argument("--out", type=Path, default=Path("build/model"))
    parser.add_argument("--model", choices=MODELS, default="hgb")
    parser.add_argument("--flag-rate", type=float, default=DEFAULT_FLAG_RATE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    parser.add_argument(
        "--class-weight",
        default=os.environ.get("class_weight") or "balanced",
        help="'balanced', 'none' or the weight of one buyer against one non-buyer "
        "(default: $class_weight, set by the sweep's matrix, or balanced)",
    )
    parser.add_argument(
        "--demo-fault",
        choices=FAULTS,
        default=os.environ.get("KILN_DEMO_FAULT") or "none",
        help="mark the model so serve.py misbehaves with it (demo only; "
        "default: $KILN_DEMO_FAULT or none)",
    )
    args = parser.parse_args(argv)
    try:
        meta = train(
            args.data,
            args.out,
            args.model,
            args.flag_rate,
            args.seed,
            args.folds,
            args.demo_fault,
            args.class_weight,
        )
    except schema.SchemaError as err:
        print(f"train: invalid input: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a bad --flag-rate, --class-weight or KILN_DEMO_FAULT
        print(f"train: {err}", file=sys.stderr)
        return 2
    cv = meta["cross_validated"]
    print(
        f"train: {meta['estimator']} on {meta['training_rows']} customers "
        f"({meta['training_positives']} buyers), class weight {meta['class_weight']}, "
        f"seed {meta['seed']}"
    )
    print(
        f"train: threshold {meta['threshold']:.4f} flags {meta['flag_rate']:.0%} of customers; "
        f"{args.folds}-fold CV on train: roc_auc {cv['roc_auc']:.3f}, "
        f"precision {cv['precision']:.3f}, recall {cv['recall']:.3f}"
    )
    if meta["demo_fault"]:
        print(
            f"train: DEMO FAULT '{meta['demo_fault']}' is set in model.json: the model itself is "
            "sound and passes offline evaluation, but serve.py will invert its predictions live",
        )
    print(
        f"train: wrote {args.out}/model.pkl, model.json and cv-metrics.json, "
        f"version {meta['version']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
