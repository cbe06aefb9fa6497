"""Stage `live-acceptance`: ask the model deployed to staging about held-out customers.

    python3 -m src.live_acceptance --endpoint "$KILN_ENDPOINT" --data build/data/test.csv \
        --model build/model --out build/live-metrics.json

``KILN_ENDPOINT`` is the staging release's endpoint, which Kiln hands to the
stages that need the environment stage. The script waits until the server
answers with the model this run trained (``/healthz`` names its version), sends
the held-out customers (``build/data/test.csv``, never seen in training; all of
them, or a seeded sample of ``--limit``) to ``POST /predict`` in batches,
compares the live answers with the true labels and writes a flat metrics file
for the coordinator's gate: ``live_accuracy``, ``live_precision``,
``live_recall``, ``live_flag_rate`` and ``live_customers``. Offline metrics
score the artifact; these score what is actually served, so a model that
evaluates well but answers wrongly once deployed is stopped in staging.
Python 3.10+, standard library only: it runs as a host process next to the
server.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TARGET = "Purchase"
BATCH = 100


def call(url: str, body: Any = None, timeout: float = 10.0) -> Any:
    """GET (no body) or POST JSON; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


def wait_for_version(endpoint: str, version: str, limit: float) -> None:
    """Block until the server serves ``version``; raise after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    seen = "nothing"
    while time.monotonic() < deadline:
        try:
            seen = call(f"{endpoint}/healthz", timeout=2.0).get("model_version", "nothing")
        except (urllib.error.URLError, OSError, ValueError) as err:
            seen = f"no answer ({getattr(err, 'reason', err)})"
        if seen == version:
            return
        time.sleep(0.2)
    raise SystemExit(f"live-acceptance: {endpoint} still serves {seen} after {limit:g}s, "
                     f"not {version}; is the staging server running?")


def held_out(path: Path, limit: int, seed: int) -> tuple[list[list[float]], list[int]]:
    """Up to ``limit`` customers of ``path`` (a seeded sample) and their labels."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if header[-1] != TARGET:
            raise SystemExit(f"live-acceptance: {path} has no {TARGET} column last")
        records = list(reader)
    random.Random(seed).shuffle(records)
    if limit:
        records = records[:limit]
    rows = [[float(v) for v in record[:-1]] for record in records]
    labels = [1 if record[-1] in ("Yes", "1") else 0 for record in records]
    if not rows:
        raise SystemExit(f"live-acceptance: {path} has no customers")
    return rows, labels


def live_metrics(predictions: list[int], labels: list[int]) -> dict[str, float]:
    """Accuracy, precision, recall and flag rate of live answers (buyers = 1)."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(1 for p, y in pairs if p == 1 and y == 1)
    fp = sum(1 for p, y in pairs if p == 1 and y == 0)
    fn = sum(1 for p, y in pairs if p == 0 and y == 1)
    correct = sum(1 for p, y in pairs if p == y)
    return {
        "live_accuracy": round(correct / len(pairs), 6),
        "live_precision": round(tp / (tp + fp), 6) if tp + fp else 0.0,
        "live_recall": round(tp / (tp + fn), 6) if tp + fn else 0.0,
        "live_flag_rate": round((tp + fp) / len(pairs), 6),
        "live_customers": len(pairs),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="the staging server's base URL")
    parser.add_argument("--data", type=Path, default=Path("build/data/test.csv"))
    parser.add_argument("--model", type=Path, default=Path("build/model"),
                        help="the model this run trained (its version must be the one served)")
    parser.add_argument("--out", type=Path, default=Path("build/live-metrics.json"))
    parser.add_argument("--limit", type=int, default=0,
                        help="customers to send, a seeded sample (default 0: all of them, so a "
                             "healthy server's answers give exactly the offline metrics)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--wait", type=float, default=30.0,
                        help="seconds to wait for the server to serve this run's model")
    args = parser.parse_args(argv)
    if not args.endpoint.startswith(("http://", "https://")):
        parser.error(f"--endpoint must be an http(s) URL, got {args.endpoint!r}")
    endpoint = args.endpoint.rstrip("/")
    version = json.loads((args.model / "model.json").read_text())["version"]
    wait_for_version(endpoint, version, args.wait)
    rows, labels = held_out(args.data, args.limit, args.seed)
    predictions: list[int] = []
    for start in range(0, len(rows), BATCH):
        answer = call(f"{endpoint}/predict", {"rows": rows[start:start + BATCH]})
        if answer.get("model_version") != version:
            raise SystemExit(f"live-acceptance: the server switched to "
                             f"{answer.get('model_version')} mid-way; expected {version}")
        predictions.extend(int(p) for p in answer["predictions"])
    metrics = live_metrics(predictions, labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"live-acceptance: {len(rows)} held-out customers sent to {endpoint} (model {version}): "
          f"accuracy {metrics['live_accuracy']:.4f} precision {metrics['live_precision']:.4f} "
          f"recall {metrics['live_recall']:.4f} flagged {metrics['live_flag_rate']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
