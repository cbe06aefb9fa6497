"""Replay labelled customers against a running serve.py to make live traffic.

    python traffic.py --url http://127.0.0.1:9101 --rate 20 --duration 60

Each tick sends one customer to ``POST /predict`` and then its true label to
``POST /feedback``, so the server's ``model_error_ratio`` tracks how often the
live model is wrong. Rows come from ``build/data/test.csv`` (held out from
training) when it exists, else ``data/raw/caravan.csv``, shuffled with a fixed
seed and cycled. ``--drift-share S`` sends a share S of them shifted one column
over, the kind of upstream fault that hurts every model alike. Prints a progress line every ``--report-every`` seconds and a
summary at the end. Standard library only, so it runs with any Python 3.9+.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import signal
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

TARGET = "Purchase"


@dataclass
class Tally:
    """What the replay has seen so far."""

    sent: int = 0
    failed: int = 0
    scored: int = 0
    correct: int = 0
    feedback: int = 0
    server_error_ratio: Optional[float] = None
    model_version: str = "?"
    last_error: str = ""

    def line(self, elapsed: float) -> str:
        """One progress line."""
        accuracy = f"{self.correct / self.scored:.3f}" if self.scored else "-"
        ratio = "-" if self.server_error_ratio is None else f"{self.server_error_ratio:.3f}"
        failed = f" failed={self.failed} ({self.last_error})" if self.failed else ""
        return (
            f"traffic: t={elapsed:5.1f}s sent={self.sent} live_accuracy={accuracy} "
            f"server_error_ratio={ratio} model={self.model_version}{failed}"
        )


def load_rows(path: Path) -> tuple[list[list[float]], list[int]]:
    """Feature rows and 0/1 labels from a Caravan-shaped CSV."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if header[-1] != TARGET or len(header) != 86:
            raise SystemExit(f"traffic: {path} is not Caravan-shaped (85 features + {TARGET})")
        rows, labels = [], []
        for record in reader:
            rows.append([float(v) for v in record[:-1]])
            labels.append(1 if record[-1] == "Yes" else 0)
    if not rows:
        raise SystemExit(f"traffic: {path} has no rows")
    return rows, labels


def post(url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST JSON, return the decoded JSON reply (raises on HTTP or network errors)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


def replay(
    url: str,
    rows: list[list[float]],
    labels: list[int],
    rate: float,
    duration: float,
    feedback_share: float,
    report_every: float,
    seed: int,
    timeout: float = 2.0,
    drift_share: float = 0.0,
) -> Tally:
    """Send ``rate`` customers a second for ``duration`` seconds (0 = until interrupted)."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    tally = Tally()
    stopping = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    start = time.monotonic()
    next_report = start + report_every
    i = 0
    while not stopping:
        now = time.monotonic()
        if duration and now - start >= duration:
            break
        due = start + i / rate
        if due > now:
            time.sleep(min(due - now, 0.5))
            continue
        index = order[i % len(order)]
        i += 1
        row, label = rows[index], labels[index]
        if drift_share and rng.random() < drift_share:
            # An upstream change moved every attribute one column over:
            # the customers are the same, the inputs are not.
            row = row[1:] + row[:1]
        tally.sent += 1
        try:
            answer = post(f"{url}/predict", {"rows": [row]}, timeout)
            tally.scored += 1
            tally.correct += int(answer["predictions"][0] == label)
            tally.model_version = answer.get("model_version", "?")
            if rng.random() < feedback_share:
                result = post(f"{url}/feedback", {"row": row, "label": label}, timeout)
                tally.feedback += 1
                tally.server_error_ratio = float(result["error_ratio"])
        except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
            tally.failed += 1
            tally.last_error = str(getattr(err, "reason", err))[:80]
        if time.monotonic() >= next_report:
            print(tally.line(time.monotonic() - start), flush=True)
            next_report += report_every
    return tally


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    default_data = Path("build/data/test.csv")
    if not default_data.exists():
        default_data = Path("data/raw/caravan.csv")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:9101", help="the server's base URL")
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--rate", type=float, default=20.0, help="customers per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds; 0 = until stopped")
    parser.add_argument("--feedback-share", type=float, default=1.0,
                        help="share of customers whose label is fed back (default all)")
    parser.add_argument("--report-every", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--drift-share", type=float, default=0.0,
                        help="share of customers sent with every attribute moved one column "
                             "over (an upstream data fault; the server's model_input_psi sees it)")
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if not 0.0 <= args.drift_share <= 1.0:
        parser.error("--drift-share must be between 0 and 1")
    rows, labels = load_rows(args.data)
    print(f"traffic: replaying {len(rows)} customers from {args.data} to {args.url} "
          f"at {args.rate:g}/s for {args.duration:g}s", flush=True)
    started = time.monotonic()
    tally = replay(args.url.rstrip("/"), rows, labels, args.rate, args.duration,
                   args.feedback_share, args.report_every, args.seed,
                   drift_share=args.drift_share)
    print(tally.line(time.monotonic() - started) + " (done)", flush=True)
    return 1 if tally.sent and tally.failed == tally.sent else 0


if __name__ == "__main__":
    sys.exit(main())
