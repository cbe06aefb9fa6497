"""A canary in production: deploy.sh serves the candidate beside the live
release and tells router.py the weight Kiln gave the step; the router splits
the traffic by it and passes the live server's metrics through."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import pytest
from threadpoolctl import threadpool_limits

import router
from src.files import read_json
from tests.test_serve import Client, deploy, start


def release(project: Path, tmp_path: Path, version: str) -> str:
    """A copy of the trained model under another version name; its directory."""
    model_dir = tmp_path / version
    shutil.copytree(project / "build/model", model_dir)
    meta = read_json(model_dir / "model.json")
    meta["version"] = version
    (model_dir / "model.json").write_text(json.dumps(meta, indent=2))
    return str(model_dir)


class Production:
    """A serving root with a server on `current`, one on `candidate`, and the router."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env_dir = root / "production"
        self.stable = start(self.env_dir)
        self.candidate = start(self.env_dir, link="candidate")
        self.router = router.make_server(0, str(self.env_dir / "router"))
        threading.Thread(target=self.router.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.router.server_address[1]}"
        self.backends = {
            "STABLE_BACKEND": Client(self.stable).base,
            "CANDIDATE_BACKEND": Client(self.candidate).base,
        }

    def deploy(self, project: Path, model_dir: str, weight: int, mode: str) -> str:
        step = {"KILN_TRAFFIC_WEIGHT": str(weight), "KILN_TRAFFIC_MODE": mode}
        done = deploy(project, self.root, "production", model_dir, {**self.backends, **step})
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def routes(self) -> dict:
        return json.loads((self.env_dir / "router" / "routes.json").read_text())

    def link(self, name: str) -> str | None:
        path = self.env_dir / name
        return os.readlink(path).removeprefix("releases/") if path.is_symlink() else None

    def stop(self) -> None:
        self.router.shutdown()
        self.router.server_close()
        for server in (self.stable, self.candidate):
            server.stop()
            server.server_close()


@pytest.fixture()
def production(tmp_path: Path) -> Iterator[Production]:
    # One OpenMP thread per prediction, as serve.py sets up for itself when
    # it is the first to load numpy (here the test suite was).
    with threadpool_limits(1):
        prod = Production(tmp_path / "serve")
        yield prod
        prod.stop()


def serving(server, version: str) -> None:
    """Waits until `server` has loaded `version`."""
    client = Client(server)
    deadline = time.monotonic() + 5
    while client.call("GET", "/healthz")[1].get("model_version") != version:
        assert time.monotonic() < deadline, f"{client.base} never loaded {version}"
        time.sleep(0.05)


def http(url: str, body: Optional[dict] = None) -> tuple[int, str]:
    """GET `url`, or POST `body` as JSON to it."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def answered_by(url: str, rows: int) -> dict[str, int]:
    """Sends `rows` predictions through the router; how many each version answered."""
    versions: dict[str, int] = {}
    for _ in range(rows):
        status, text = http(url + "/predict", {"rows": [[1] * 85]})
        assert status == 200, text
        version = json.loads(text)["model_version"]
        versions[version] = versions.get(version, 0) + 1
    return versions


def test_a_canary_is_served_beside_the_live_release_then_promoted(
    project: Path, tmp_path: Path, production: Production,
) -> None:
    random.seed(17)  # the router's draws: the same split on every run
    v1, v2 = release(project, tmp_path, "v1"), release(project, tmp_path, "v2")
    production.deploy(project, v1, 100, "full")
    serving(production.stable, "v1")
    assert production.routes()["stable"] == production.backends["STABLE_BACKEND"]
    assert answered_by(production.url, 5) == {"v1": 5}

    said = production.deploy(project, v2, 25, "canary")
    assert "candidate is v2" in said and "at 25% (canary)" in said, said
    assert (production.link("current"), production.link("candidate")) == ("v1", "v2")
    # deploy.sh routed traffic there only once the candidate's server had it.
    assert Client(production.candidate).call("GET", "/healthz")[1]["model_version"] == "v2"
    routes = production.routes()
    assert routes["candidate"] == production.backends["CANDIDATE_BACKEND"]
    assert (routes["weight"], routes["mode"]) == (25, "canary")
    versions = answered_by(production.url, 40)
    # 25% of 40 is 10; a fair split (whatever the seed) lands in 2..20 but
    # about once in a thousand.
    assert 2 <= versions.get("v2", 0) <= 20, versions
    assert versions["v1"] + versions["v2"] == 40

    # The router's /metrics: its counts per backend, then the live server's own.
    status, text = http(production.url + "/metrics")
    assert status == 200, text
    routed = re.search(r'^router_requests\{backend="candidate"\} (\d+)$', text, re.M)
    assert routed and int(routed.group(1)) == versions["v2"], text
    assert 'model_info{version="v1"} 1' in text, text
    assert 'version="v2"' not in text, "the candidate's own metrics stay on its server"
    assert "router_weight 25" in text

    production.deploy(project, v2, 100, "full")
    assert (production.link("current"), production.link("candidate")) == ("v2", None)
    assert production.routes()["candidate"] is None
    serving(production.stable, "v2")
    assert answered_by(production.url, 5) == {"v2": 5}
    history = (production.env_dir / "router" / "history.log").read_text().split("\n")
    assert [line.split(" ")[:2] for line in history if line] == [
        ["100", "full"], ["25", "canary"], ["100", "full"]]


def test_an_abort_gives_the_live_release_all_the_traffic_back(
    project: Path, tmp_path: Path, production: Production,
) -> None:
    v1, v2 = release(project, tmp_path, "v1"), release(project, tmp_path, "v2")
    production.deploy(project, v1, 100, "full")
    production.deploy(project, v2, 50, "canary")
    said = production.deploy(project, v1, 100, "full")
    assert "already is v1; nothing to switch" in said and "no candidate any more" in said, said
    assert (production.link("current"), production.link("candidate")) == ("v1", None)
    assert production.routes()["candidate"] is None
    serving(production.stable, "v1")
    assert answered_by(production.url, 5) == {"v1": 5}
    assert (production.env_dir / "releases" / "v2").is_dir(), "kept for a later attempt"


def test_the_router_is_not_set_before_the_backend_serves_the_release(
    tmp_path: Path, production: Production,
) -> None:
    # Nothing is on `candidate`: its server answers 503 and never loads v2.
    with pytest.raises(SystemExit, match="did not serve v2 within 0.5s .*routes unchanged"):
        router.wait_for_version(production.backends["CANDIDATE_BACKEND"], "v2", 0.5)


def test_a_canary_step_needs_a_router_and_a_percent(project: Path, tmp_path: Path) -> None:
    alone = deploy(project, tmp_path, "production", extra_env={"KILN_TRAFFIC_WEIGHT": "25"})
    assert alone.returncode != 0 and "needs a router" in alone.stderr, alone.stderr
    assert not (tmp_path / "production").exists(), "nothing was installed"
    for weight in ("150", "ten", "-5"):
        bad = deploy(project, tmp_path, "production", extra_env={"KILN_TRAFFIC_WEIGHT": weight})
        assert bad.returncode != 0 and "percent from 0 to 100" in bad.stderr, bad.stderr
    # Without Kiln's variables a deploy is a full one, router or not.
    full = deploy(project, tmp_path, "production")
    assert full.returncode == 0 and "production now serves" in full.stdout, full.stderr


def test_the_router_adds_only_a_live_servers_prometheus_text(tmp_path: Path) -> None:
    class NotMetrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", "1")
            self.end_headers()
            self.wfile.write(b"1")

        def log_message(self, *args: object) -> None:
            pass

    plain = ThreadingHTTPServer(("127.0.0.1", 0), NotMetrics)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    server = router.make_server(0, str(tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    try:
        for live in (f"http://127.0.0.1:{plain.server_address[1]}", "http://127.0.0.1:9"):
            router.set_route(str(tmp_path), live, 100, "full")
            status, text = http(url)
            samples = [line for line in text.splitlines() if not line.startswith("#")]
            assert status == 200 and "router_weight 0" in samples, text
            assert all(line.startswith("router_") for line in samples), f"{live}: {text}"
    finally:
        for stop in (server, plain):
            stop.shutdown()
            stop.server_close()