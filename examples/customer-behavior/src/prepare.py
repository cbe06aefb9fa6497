"""Stage `prepare`: validate the raw Caravan file and split it for training.

    python -m src.prepare --raw data/raw/caravan.csv --out build/data

Writes ``train.csv`` and ``test.csv`` (same columns as the raw file) and
``manifest.json`` (rows, buyers, the raw file's sha256, the split settings).
The split is stratified on ``Purchase`` with a fixed seed, so the same input
always gives byte-identical outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.model_selection import train_test_split

from src import schema
from src.files import sha256_file, write_json

DEFAULT_SEED = 7
DEFAULT_TEST_SIZE = 0.25


def split(
    frame: pd.DataFrame, test_size: float = DEFAULT_TEST_SIZE, seed: int = DEFAULT_SEED
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified train/test split of a validated frame (deterministic)."""
    train, test = train_test_split(
        frame, test_size=test_size, stratify=frame[schema.TARGET], random_state=seed
    )
    return train, test


def counts(frame: pd.DataFrame) -> dict[str, int]:
    """Rows and buyers of a frame."""
    return {
        "rows": int(len(frame)),
        "positives": int((frame[schema.TARGET] == schema.POSITIVE).sum()),
    }


def prepare(
    raw: Path, out: Path, test_size: float = DEFAULT_TEST_SIZE, seed: int = DEFAULT_SEED
) -> dict[str, Any]:
    """Validate ``raw``, write the split and the manifest into ``out``; return the manifest."""
    frame = schema.load(raw)
    train, test = split(frame, test_size, seed)
    out.mkdir(parents=True, exist_ok=True)
    train.to_csv(out / "train.csv", index=False)
    test.to_csv(out / "test.csv", index=False)
    manifest = {
        "source": str(raw),
        "sha256": sha256_file(raw),
        **counts(frame),
        "features": len(schema.FEATURES),
        "seed": seed,
        "test_size": test_size,
        "train": counts(train),
        "test": counts(test),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=Path("data/raw/caravan.csv"))
    parser.add_argument("--out", type=Path, default=Path("build/data"))
    parser.add_argument("--test-size", type=float, default=DEFAULT_TEST_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    try:
        manifest = prepare(args.raw, args.out, args.test_size, args.seed)
    except schema.SchemaError as err:
        print(f"prepare: invalid input: {err}", file=sys.stderr)
        return 2
    rate = manifest["positives"] / manifest["rows"]
    print(f"prepare: {args.raw} sha256 {manifest['sha256']}")
    print(
        f"prepare: {manifest['rows']} customers, {manifest['positives']} buyers ({rate:.1%}); "
        f"train {manifest['train']['rows']} ({manifest['train']['positives']} buyers), "
        f"test {manifest['test']['rows']} ({manifest['test']['positives']} buyers), "
        f"seed {args.seed}"
    )
    print(f"prepare: wrote {args.out}/train.csv, test.csv, manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
