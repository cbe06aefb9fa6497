"""A small model server for the deployed Caravan buyer model (stdlib HTTP only).

    python serve.py --env-dir /tmp/kiln-serve/production --port 9101

Serves the model that ``deploy.sh ENV`` installed as ``ENV_DIR/current``
(``model.pkl``, ``model.json``, ``VERSION``) and reloads it within a second of
``current`` changing, so a deployment or a rollback needs no restart. Listens
on 127.0.0.1 only. ``--link candidate`` serves ``ENV_DIR/candidate`` instead:
the release a canary is rolling out, beside the live one (router.py splits the
traffic between the two servers).

- ``POST /predict``  ``{"rows": [[85 numbers], ...]}`` or
  ``{"customers": [{"MOSTYPE": 33, ...}, ...]}`` ->
  ``{"predictions": [0|1, ...], "probabilities": [...], "model_version": "..."}``
- ``POST /feedback`` ``{"row": [...]}`` or ``{"customer": {...}}`` plus
  ``"label": 0|1`` (or "Yes"/"No"): scores the customer, compares with the
  true label and keeps a sliding window of the last ``--window`` outcomes.
- ``GET /healthz``   200 with the model version once a model is loaded, else 503.
- ``GET /metrics``   Prometheus text exposition: model_requests_total,
  model_errors_total, model_latency_seconds (histogram), model_feedback_total,
  model_error_ratio (wrong / feedback in the window), model_input_psi (input
  drift: the largest population stability index of a feature over the last
  ``--drift-window`` scored customers against the model's training data, see
  src/drift.py), model_info{version}, ...

The feedback window belongs to the model being served: it restarts empty when
a new model is loaded, and ``model_error_ratio`` stays 0 until the window holds
``--min-feedback`` items, so one unlucky early answer cannot trip a monitor.

Demo fault (for showing a rollback): ``--fault invert`` or
``KILN_DEMO_FAULT=invert`` inverts every answer of every model this server
loads; a model trained with ``KILN_DEMO_FAULT=invert`` carries
``"demo_fault": "invert"`` in its model.json and is inverted only while it is
the one deployed. Either way the server says so in its log, in ``/healthz`` and
in the ``model_demo_fault`` metric.
"""

from __future__ import annotations

import os

# One OpenMP thread per prediction: requests are tiny and served by a thread
# each, so worker threads would only spin against each other. Set before numpy
# or scikit-learn load their OpenMP runtime.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

from src.drift import DriftWindow  # noqa: E402

LOG = logging.getLogger("serve")
HOST = "127.0.0.1"
FAULTS = ("invert",)
MAX_BODY = 8 << 20
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class BadRequest(ValueError):
    """The client sent something this server cannot score (HTTP 400)."""


class Unavailable(RuntimeError):
    """No model is loaded yet (HTTP 503)."""


@dataclass
class LoadedModel:
    """One deployed model, as read from a release directory."""

    estimator: Any
    features: list[str]
    threshold: float
    version: str
    directory: str
    fault: Optional[str]
    fault_source: str = ""
    # Each feature's share of each value in the training data (model.json
    # "reference"); None for a model trained before drift was measured.
    reference: Optional[dict[str, dict[str, float]]] = None

    def score(self, rows: list[list[float]]) -> tuple[list[int], list[float]]:
        """Predictions (1 = buyer) and buyer probabilities, with the demo fault applied."""
        import pandas as pd

        frame = pd.DataFrame(rows, columns=self.features, dtype=float)
        probabilities = [float(p) for p in self.estimator.predict_proba(frame)[:, 1]]
        predictions = [int(p >= self.threshold) for p in probabilities]
        if self.fault == "invert":
            predictions = [1 - p for p in predictions]
            probabilities = [1.0 - p for p in probabilities]
        return predictions, probabilities


def load_release(directory: Path, server_fault: Optional[str]) -> LoadedModel:
    """Load ``model.pkl``, ``model.json`` and ``VERSION`` from one release directory."""
    meta = json.loads((directory / "model.json").read_text())
    version = (directory / "VERSION").read_text().splitlines()[0].strip()
    with open(directory / "model.pkl", "rb") as handle:
        estimator = pickle.load(handle)
    features = [str(name) for name in meta["features"]]
    fault, source = None, ""
    if server_fault:
        fault, source = server_fault, "the server (--fault / KILN_DEMO_FAULT)"
    elif meta.get("demo_fault"):
        fault, source = str(meta["demo_fault"]), "the release (model.json demo_fault)"
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown demo fault {fault!r} set by {source}")
    return LoadedModel(
        estimator, features, float(meta["threshold"]), version or "unknown", str(directory),
        fault, source, meta.get("reference"),
    )


@dataclass
class Stats:
    """Counters, the latency histogram and the feedback window (guarded by ``lock``)."""

    window_size: int
    min_feedback: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    errors: int = 0
    feedback: int = 0
    predictions: int = 0
    predicted_buyers: int = 0
    reloads: int = 0
    load_failures: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    latency_count: int = 0
    window: deque = field(default_factory=deque)

    def observe(self, seconds: float, failed: bool) -> None:
        """Record one model request (prediction or feedback)."""
        with self.lock:
            self.requests += 1
            self.errors += int(failed)
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_counts[i] += 1

    def add_feedback(self, wrong: bool) -> tuple[float, int]:
        """Record one labelled outcome; returns the error ratio and the window length."""
        with self.lock:
            self.feedback += 1
            self.window.append(wrong)
            while len(self.window) > self.window_size:
                self.window.popleft()
            return self._ratio(), len(self.window)

    def _ratio(self) -> float:
        if len(self.window) < max(1, self.min_feedback):
            return 0.0
        return sum(self.window) / len(self.window)


class ModelServer(ThreadingHTTPServer):
    """The HTTP server plus the served model and its statistics."""

    daemon_threads = True

    def __init__(
        self,
        env_dir: Path,
        port: int,
        window: int = 300,
        min_feedback: int = 100,
        poll: float = 1.0,
        fault: Optional[str] = None,
        drift_window: int = 500,
        drift_min_rows: int = 500,
        link: str = "current",
    ) -> None:
        super().__init__((HOST, port), Handler)
        self.env_dir = env_dir
        # The symlink in env_dir this server follows: `current` or `candidate`.
        self.link = link
        self.poll = poll
        self.server_fault = fault
        self.stats = Stats(window_size=window, min_feedback=min_feedback)
        # The inputs, not the model: kept across reloads, so a restored model
        # is judged on the same customers at once.
        self.drift: Optional[DriftWindow] = None
        self.drift_window = drift_window
        self.drift_min_rows = drift_min_rows
        self.model: Optional[LoadedModel] = None
        # True while `current` names a release that could not be loaded.
        self.stale = False
        self._seen: Optional[tuple] = None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="reload", daemon=True)

    def start_watching(self) -> None:
        """Load the current model now, then poll for a new one every ``poll`` seconds."""
        self.check_for_new_model()
        self._watcher.start()

    def stop(self) -> None:
        """Stop the watcher and the HTTP loop."""
        self._stop.set()
        self.shutdown()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self.check_for_new_model()

    def check_for_new_model(self) -> None:
        """Reload when the link points elsewhere or its VERSION file changed."""
        current = self.env_dir / self.link
        try:
            info = os.stat(current / "VERSION")
            real = os.path.realpath(current)
        except OSError:
            if self._seen != ("missing",):
                LOG.warning("no model deployed yet at %s (waiting for deploy.sh)", current)
                self._seen = ("missing",)
            return
        key = (real, info.st_ino, info.st_mtime_ns, info.st_size)
        if key == self._seen:
            return
        self._seen = key
        try:
            model = load_release(Path(real), self.server_fault)
        except Exception as err:  # noqa: BLE001 - any broken release keeps the old model
            self.stats.load_failures += 1
            self.stale = True
            LOG.error("cannot load the model in %s: %s; still serving %s", real, err,
                      self.model.version if self.model else "nothing")
            return
        previous = self.model.version if self.model else None
        with self.stats.lock:
            self.model = model
            self.stats.window.clear()  # the window is about the served model only
        self.stale = False
        if previous is not None:
            self.stats.reloads += 1
        LOG.info("serving model %s from %s (threshold %.4f)%s", model.version, real,
                 model.threshold, f", replacing {previous}" if previous else "")
        if model.fault:
            LOG.warning("!!! DEMO FAULT ACTIVE: '%s' set by %s: every prediction of model %s "
                        "is deliberately inverted", model.fault, model.fault_source, model.version)

    # -- request handling -------------------------------------------------

    def current_model(self) -> LoadedModel:
        """The model to answer with, or :class:`Unavailable`."""
        model = self.model
        if model is None:
            raise Unavailable(f"no model deployed in {self.env_dir}/{self.link}")
        return model

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer ``POST /predict``."""
        model = self.current_model()
        if "rows" in body:
            rows = [_row(r, model.features) for r in _list(body, "rows")]
        elif "customers" in body:
            rows = [_customer(c, model.features) for c in _list(body, "customers")]
        else:
            raise BadRequest('send {"rows": [[...], ...]} or {"customers": [{...}, ...]}')
        predictions, probabilities = model.score(rows)
        if self.drift is None or self.drift.features != model.features:
            self.drift = DriftWindow(model.features, self.drift_window, self.drift_min_rows)
        self.drift.add(rows)
        with self.stats.lock:
            self.stats.predictions += len(predictions)
            self.stats.predicted_buyers += sum(predictions)
        return {
            "predictions": predictions,
            "probabilities": [round(p, 6) for p in probabilities],
            "model_version": model.version,
        }

    def give_feedback(self, body: dict[str, Any]) -> dict[str, Any]:
        """Answer ``POST /feedback``."""
        model = self.current_model()
        if "row" in body:
            row = _row(body["row"], model.features)
        elif "customer" in body:
            row = _customer(body["customer"], model.features)
        else:
            raise BadRequest('send {"row": [...]} or {"customer": {...}} with "label"')
        label = _label(body.get("label"))
        (prediction,), _ = model.score([row])
        wrong = prediction != label
        ratio, size = self.stats.add_feedback(wrong)
        return {
            "prediction": prediction,
            "label": label,
            "correct": not wrong,
            "error_ratio": round(ratio, 6),
            "window": size,
            "model_version": model.version,
        }

    def health(self) -> tuple[int, dict[str, Any]]:
        """Answer ``GET /healthz``."""
        model = self.model
        if model is None:
            return 503, {"status": "no model", "env_dir": str(self.env_dir)}
        return 200, {"status": "ok", "model_version": model.version, "fault": model.fault}

    def exposition(self) -> str:
        """The Prometheus text exposition of everything above."""
        model = self.model
        s = self.stats
        with s.lock:
            ratio = s._ratio()
            lines: list[str] = []
            _family(lines, "model_requests_total", "counter",
                    "Prediction and feedback requests received.", [("", s.requests)])
            _family(lines, "model_errors_total", "counter",
                    "Prediction and feedback requests that failed (HTTP 4xx/5xx).",
                    [("", s.errors)])
            _family(lines, "model_latency_seconds", "histogram",
                    "Time to answer a prediction or feedback request.", [])
            for bound, count in zip(LATENCY_BUCKETS, s.latency_counts, strict=True):
                lines.append(f'model_latency_seconds_bucket{{le="{_num(bound)}"}} {count}')
            lines.append(f'model_latency_seconds_bucket{{le="+Inf"}} {s.latency_count}')
            lines.append(f"model_latency_seconds_sum {_num(s.latency_sum)}")
            lines.append(f"model_latency_seconds_count {s.latency_count}")
            _family(lines, "model_predictions_total", "counter",
                    "Customers scored by /predict.", [("", s.predictions)])
            _family(lines, "model_predicted_buyers_total", "counter",
                    "Customers /predict flagged as likely buyers.", [("", s.predicted_buyers)])
            _family(lines, "model_feedback_total", "counter",
                    "Labelled feedback items received.", [("", s.feedback)])
            _family(lines, "model_feedback_window", "gauge",
                    "Feedback items about the current model in the sliding window.",
                    [("", len(s.window))])
            _family(lines, "model_error_ratio", "gauge",
                    "Wrong predictions / feedback items in the window "
                    f"(0 until it holds {s.min_feedback}).", [("", ratio)])
            _family(lines, "model_reloads_total", "counter",
                    "Times a newly deployed model replaced the served one.", [("", s.reloads)])
            _family(lines, "model_load_failures_total", "counter",
                    "Deployed models that could not be loaded.", [("", s.load_failures)])
        drift = self.drift
        worst = drift.worst(model.reference) if drift and model and model.reference else None
        _family(lines, "model_input_psi", "gauge",
                "Largest population stability index of a feature over the scored window "
                f"against the training data (0 until it holds {self.drift_min_rows} customers).",
                [("", worst[0] if worst else 0.0)])
        _family(lines, "model_input_drift_window", "gauge",
                "Scored customers in the drift window.", [("", len(drift) if drift else 0)])
        if worst:
            _family(lines, "model_input_psi_worst_feature", "gauge",
                    "The feature with the largest PSI (its value is that PSI).",
                    [(f'{{feature="{_escape(worst[1])}"}}', worst[0])])
        version = model.version if model else "none"
        _family(lines, "model_info", "gauge", "The model being served.",
                [(f'{{version="{_escape(version)}"}}', 1 if model else 0)])
        fault = model.fault if model and model.fault else "none"
        _family(lines, "model_demo_fault", "gauge",
                "1 while a demo fault deliberately corrupts the served predictions.",
                [(f'{{mode="{_escape(fault)}"}}', 0 if fault == "none" else 1)])
        _family(lines, "model_up", "gauge", "1 when a model is loaded.", [("", 1 if model else 0)])
        _family(lines, "model_stale", "gauge",
                "1 while the deployed release could not be loaded and an older model answers.",
                [("", 1 if self.stale else 0)])
        return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`ModelServer`."""

    server: ModelServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/metrics":
            self._send(200, self.server.exposition().encode(),
                       "text/plain; version=0.0.4; charset=utf-8")
        elif self.path == "/healthz":
            status, body = self.server.health()
            self._json(status, body)
        else:
            self._json(404, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/predict": self.server.predict, "/feedback": self.server.give_feedback}
        action = routes.get(self.path)
        if action is None:
            self.close_connection = True  # the body was not read
            self._json(404, {"error": f"no such path {self.path}"})
            return
        started = time.perf_counter()
        status, reply = 200, {}
        try:
            reply = action(self._body())
        except BadRequest as err:
            status, reply = 400, {"error": str(err)}
        except Unavailable as err:
            status, reply = 503, {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - report, count, keep serving
            LOG.exception("%s failed", self.path)
            status, reply = 500, {"error": f"internal error: {err}"}
        self.server.stats.observe(time.perf_counter() - started, status >= 400)
        if status >= 400:
            self.close_connection = True  # the body may not have been read
        self._json(status, reply)

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("a Content-Length header is required")
        if int(length) > MAX_BODY:
            raise BadRequest(f"body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadRequest(f"body is not JSON: {err}") from err
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        return body

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, (json.dumps(body) + "\n").encode(), "application/json")

    def _send(self, status: int, payload: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up before reading the answer; nothing to tell it.
            LOG.debug("%s went away before the reply to %s", self.address_string(), self.path)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Access logs only at debug level: traffic would drown the reload messages."""
        LOG.debug("%s %s", self.address_string(), format % args)


# -- input validation -------------------------------------------------------

def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body[key]
    if not isinstance(value, list) or not value:
        raise BadRequest(f'"{key}" must be a non-empty list')
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _row(row: Any, features: list[str]) -> list[float]:
    if not isinstance(row, list) or len(row) != len(features):
        raise BadRequest(f"each row must be a list of {len(features)} numbers in model.json order")
    return [_number(v, f"feature {name}") for v, name in zip(row, features, strict=True)]


def _customer(customer: Any, features: list[str]) -> list[float]:
    if not isinstance(customer, dict):
        raise BadRequest("each customer must be an object of feature: value")
    missing = [name for name in features if name not in customer]
    unknown = sorted(set(customer) - set(features))
    if missing or unknown:
        raise BadRequest(f"customer fields: missing {missing[:5]}, unknown {unknown[:5]}")
    return [_number(customer[name], f"feature {name}") for name in features]


def _label(value: Any) -> int:
    if value in ("Yes", "No"):
        return int(value == "Yes")
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    raise BadRequest(f'"label" must be 0, 1, "Yes" or "No", got {value!r}')


# -- exposition helpers -----------------------------------------------------

def _family(lines: list[str], name: str, kind: str, help_text: str,
            samples: list[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)


def _num(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-dir", type=Path, required=True,
                        help="the environment's serving directory (deploy.sh's target)")
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--link", choices=("current", "candidate"), default="current",
                        help="serve ENV_DIR/current (the live release, default) or "
                             "ENV_DIR/candidate (a canary's)")
    parser.add_argument("--window", type=int, default=300,
                        help="feedback items in the error-ratio window (default 300)")
    parser.add_argument("--min-feedback", type=int, default=100,
                        help="items needed before the error ratio is reported (default 100)")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between reload checks")
    parser.add_argument("--drift-window", type=int, default=500,
                        help="scored customers the input drift is measured over (default 500)")
    parser.add_argument("--drift-min-rows", type=int, default=500,
                        help="customers needed before model_input_psi is reported (default 500: a part-full window reads noisy)")
    parser.add_argument("--fault", choices=("none", *FAULTS),
                        default=os.environ.get("KILN_DEMO_FAULT") or "none",
                        help="demo only: corrupt every served model (default $KILN_DEMO_FAULT)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.fault not in ("none", *FAULTS):
        parser.error(f"KILN_DEMO_FAULT={args.fault!r}: expected none or {', '.join(FAULTS)}")
    args.fault = None if args.fault == "none" else args.fault
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s serve: %(message)s", stream=sys.stderr)
    server = ModelServer(args.env_dir, args.port, args.window, args.min_feedback, args.poll,
                         args.fault, args.drift_window, args.drift_min_rows, args.link)
    if args.fault:
        LOG.warning("!!! DEMO FAULT '%s' requested for this server: every model it serves "
                    "will answer wrongly on purpose", args.fault)
    server.start_watching()

    def stop(signum: int, _frame: Any) -> None:
        LOG.info("signal %d: shutting down", signum)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    LOG.info("listening on http://%s:%d (env dir %s)", HOST, server.server_address[1], args.env_dir)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
