"""deploy.sh installs and switches releases; serve.py scores, counts and reloads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional
from collections.abc import Iterator

import pytest

import serve
from src import schema
from src.evaluate import load_model
from src.files import read_json
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy.sh"


def deploy(project: Path, serve_root: Path, env: str = "staging",
           model_dir: str = "build/model",
           extra_env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """Run deploy.sh the way the pipeline does (cwd = the project)."""
    return subprocess.run(
        ["sh", str(DEPLOY), env, model_dir], cwd=project, capture_output=True, text=True,
        env={"PATH": os.environ["PATH"], "KILN_SERVE_ROOT": str(serve_root), **(extra_env or {})},
        timeout=30, check=False,
    )


class Client:
    """A tiny JSON client for one running server."""

    def __init__(self, server: serve.ModelServer) -> None:
        self.server = server
        self.base = f"http://127.0.0.1:{server.server_address[1]}"

    def call(self, method: str, path: str, body: Any = None,
             raw: Optional[bytes] = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                status, payload = reply.status, reply.read()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read()
        text = payload.decode()
        return status, (text if path == "/metrics" else json.loads(text))

    def metric(self, name: str) -> float:
        _, text = self.call("GET", "/metrics")
        match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert match, name
        return float(match.group(1))


def start(env_dir: Path, fault: Optional[str] = None, link: str = "current") -> serve.ModelServer:
    server = serve.ModelServer(env_dir, 0, window=20, min_feedback=5, poll=0.05, fault=fault,
                               link=link)
    server.start_watching()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return server


@pytest.fixture()
def serve_root(project: Path, tmp_path: Path) -> Path:
    done = deploy(project, tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path


@pytest.fixture()
def client(serve_root: Path) -> Iterator[Client]:
    server = start(serve_root / "staging")
    yield Client(server)
    server.stop()
    server.server_close()


@pytest.fixture(scope="module")
def test_rows(project: Path) -> tuple[list[list[float]], list[int]]:
    x, y = schema.split_xy(schema.load(project / "build/data/test.csv"))
    return x.astype(float).values.tolist(), y.tolist()


def offline_predictions(project: Path, rows: list[list[float]]) -> list[int]:
    import pandas as pd

    model, meta = load_model(project / "build/model")
    scores = model.predict_proba(pd.DataFrame(rows, columns=list(schema.FEATURES)))[:, 1]
    return [int(s >= meta["threshold"]) for s in scores]


# -- deploy.sh ---------------------------------------------------------------

def test_deploy_switches_current_atomically_and_idempotently(project: Path,
                                                             serve_root: Path) -> None:
    meta = read_json(project / "build/model/model.json")
    current = serve_root / "staging" / "current"
    assert os.readlink(current) == f"releases/{meta['version']}"
    assert (current / "VERSION").read_text().splitlines()[0] == meta["version"]
    assert (current / "model.pkl").read_bytes() == (project / "build/model/model.pkl").read_bytes()
    again = deploy(project, serve_root)
    assert again.returncode == 0 and "nothing to switch" in again.stdout
    assert os.readlink(current) == f"releases/{meta['version']}"


def test_deploy_refuses_a_missing_model(tmp_path: Path) -> None:
    done = deploy(tmp_path, tmp_path / "serve")
    assert done.returncode != 0 and "missing" in done.stderr


# -- serve.py ----------------------------------------------------------------

def test_predict_matches_the_offline_model(client: Client, project: Path,
                                           test_rows: tuple[list, list]) -> None:
    rows = test_rows[0][:25]
    status, reply = client.call("POST", "/predict", {"rows": rows})
    assert status == 200
    assert reply["predictions"] == offline_predictions(project, rows)
    assert all(0.0 <= p <= 1.0 for p in reply["probabilities"])
    assert reply["model_version"] == read_json(project / "build/model/model.json")["version"]
    customers = [dict(zip(schema.FEATURES, row, strict=True)) for row in rows]
    status, by_name = client.call("POST", "/predict", {"customers": customers})
    assert status == 200 and by_name["predictions"] == reply["predictions"]


@pytest.mark.parametrize("body", [
    {"rows": [[1, 2, 3]]},
    {"rows": []},
    {"customers": [{"MOSTYPE": 1}]},
    {"nothing": True},
    {"rows": [["x"] * 85]},
])
def test_bad_requests_are_400_and_counted(client: Client, body: Any) -> None:
    status, reply = client.call("POST", "/predict", body)
    assert status == 400 and reply["error"]
    assert client.metric("model_errors_total") == 1
    assert client.metric("model_requests_total") == 1


def test_non_json_and_unknown_paths(client: Client) -> None:
    assert client.call("POST", "/predict", raw=b"{not json")[0] == 400
    assert client.call("GET", "/nowhere")[0] == 404
    assert client.call("GET", "/healthz")[0] == 200


def test_feedback_error_ratio_over_the_window(client: Client, project: Path,
                                              test_rows: tuple[list, list]) -> None:
    rows, labels = test_rows[0][:30], test_rows[1][:30]
    predicted = offline_predictions(project, rows)
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        status, reply = client.call("POST", "/feedback", {"row": row, "label": label})
        assert status == 200 and reply["correct"] == (predicted[i] == label)
        if i < 4:  # fewer than min_feedback items: no evidence yet
            assert reply["error_ratio"] == 0.0
    wrong = [p != y for p, y in zip(predicted, labels, strict=True)][-20:]  # window of 20
    assert client.metric("model_error_ratio") == pytest.approx(sum(wrong) / 20)
    assert client.metric("model_feedback_total") == 30
    assert client.metric("model_feedback_window") == 20
    assert client.call("POST", "/feedback", {"row": rows[0], "label": 2})[0] == 400


def test_metrics_are_valid_exposition(client: Client, test_rows: tuple[list, list]) -> None:
    client.call("POST", "/predict", {"rows": test_rows[0][:3]})
    status, text = client.call("GET", "/metrics")
    assert status == 200 and text.endswith("\n")
    declared: dict[str, str] = {}
    helped: set[str] = set()
    label = r'[a-zA-Z_]+="[^"\\]*"'
    sample = re.compile(rf"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{{{label}(,{label})*\}})? (\S+)$")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram") and name in helped
            declared[name] = kind
        else:
            match = sample.match(line)
            assert match, line
            name = re.sub(r"_(bucket|sum|count)$", "", match.group(1))
            family = match.group(1) if match.group(1) in declared else name
            assert family in declared, line
            float(match.group(4))
    for name in ("model_requests_total", "model_errors_total", "model_latency_seconds",
                 "model_feedback_total", "model_error_ratio", "model_info"):
        assert name in declared, name
    assert declared["model_latency_seconds"] == "histogram"
    assert 'model_latency_seconds_bucket{le="+Inf"} 1' in text
    assert re.search(r'^model_info\{version="(local|run)[^"]*"\} 1$', text, re.M)


def test_input_drift_is_measured_against_the_training_data(
        serve_root: Path, test_rows: tuple[list, list]) -> None:
    server = serve.ModelServer(serve_root / "staging", 0, poll=0.05, drift_window=200,
                               drift_min_rows=50)
    server.start_watching()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    client = Client(server)
    try:
        rows = (test_rows[0] * 10)[:400]  # the fixture holds a small sample
        client.call("POST", "/predict", {"rows": rows[:49]})
        assert client.metric("model_input_psi") == 0.0, "too few customers to judge"
        client.call("POST", "/predict", {"rows": rows[49:200]})
        assert client.metric("model_input_drift_window") == 200
        # The fixture's model is trained on a small sample, so even held-out
        # customers differ from it by some sampling noise.
        clean = client.metric("model_input_psi")
        # Every attribute moved one column over: the population the model
        # was trained on is gone, whatever the model.
        client.call("POST", "/predict", {"rows": [r[1:] + r[:1] for r in rows[200:400]]})
        shifted = client.metric("model_input_psi")
        assert shifted > 1.0 and shifted > 3 * clean, (clean, shifted)
        _, text = client.call("GET", "/metrics")
        assert re.search(r'^model_input_psi_worst_feature\{feature="[A-Z]+"\} ', text, re.M)
    finally:
        server.stop()
        server.server_close()


def test_server_fault_inverts_predictions(serve_root: Path, project: Path,
                                          test_rows: tuple[list, list]) -> None:
    server = start(serve_root / "staging", fault="invert")
    try:
        client = Client(server)
        rows = test_rows[0][:10]
        _, reply = client.call("POST", "/predict", {"rows": rows})
        assert reply["predictions"] == [1 - p for p in offline_predictions(project, rows)]
        assert 'model_demo_fault{mode="invert"} 1' in client.call("GET", "/metrics")[1]
        assert client.call("GET", "/healthz")[1]["fault"] == "invert"
    finally:
        server.stop()
        server.server_close()


def test_a_new_release_is_picked_up_and_its_fault_honoured(
    client: Client, project: Path, serve_root: Path, tmp_path: Path,
    test_rows: tuple[list, list],
) -> None:
    rows, labels = test_rows[0][:8], test_rows[1][:8]
    for row, label in zip(rows, labels, strict=True):
        client.call("POST", "/feedback", {"row": row, "label": label})
    faulty = tmp_path / "faulty"
    shutil.copytree(project / "build/model", faulty)
    meta = read_json(faulty / "model.json")
    meta["demo_fault"], meta["version"] = "invert", "run99-faulty"
    (faulty / "model.json").write_text(json.dumps(meta, indent=2))
    done = deploy(project, serve_root, model_dir=str(faulty))
    assert done.returncode == 0 and "DEMO FAULT" in done.stdout
    deadline = time.monotonic() + 5
    while client.call("GET", "/healthz")[1]["model_version"] != "run99-faulty":
        assert time.monotonic() < deadline, "the server did not reload"
        time.sleep(0.05)
    assert client.metric("model_reloads_total") == 1
    assert client.metric("model_feedback_window") == 0  # the window is per model
    _, reply = client.call("POST", "/predict", {"rows": rows})
    assert reply["predictions"] == [1 - p for p in offline_predictions(project, rows)]


def test_a_broken_release_keeps_the_old_model_and_says_so(
    client: Client, project: Path, serve_root: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(project / "build/model", broken)
    (broken / "model.pkl").write_bytes(b"not a pickle")
    meta = read_json(broken / "model.json")
    meta["version"] = "run98-broken"
    (broken / "model.json").write_text(json.dumps(meta, indent=2))
    assert deploy(project, serve_root, model_dir=str(broken)).returncode == 0
    deadline = time.monotonic() + 5
    while client.metric("model_stale") != 1:
        assert time.monotonic() < deadline, "the broken release went unnoticed"
        time.sleep(0.05)
    assert client.metric("model_load_failures_total") == 1
    served = client.call("GET", "/healthz")[1]["model_version"]
    assert served == read_json(project / "build/model/model.json")["version"]


def test_no_model_yet_is_503(tmp_path: Path) -> None:
    server = start(tmp_path / "empty")
    try:
        client = Client(server)
        assert client.call("GET", "/healthz")[0] == 503
        assert client.call("POST", "/predict", {"rows": [[0] * 85]})[0] == 503
        assert 'model_info{version="none"} 0' in client.call("GET", "/metrics")[1]
    finally:
        server.stop()
        server.server_close()
