"""A small traffic router for progressive delivery (standard library only).

Kiln decides every step of a rollout; this router only does what the
deploy script tells it. Two commands:

    python router.py serve --port 9100 --state-dir /tmp/kiln-serve/router
    python router.py set --state-dir DIR --url http://127.0.0.1:9102 \
        --weight "$KILN_TRAFFIC_WEIGHT" --mode "$KILN_TRAFFIC_MODE" \
        [--wait-for VERSION]

`set` records where the release just deployed is served and how much
traffic it gets: at weight 100 (`full`) it becomes the `stable` backend
and the candidate is dropped; below, it is the `candidate`, which gets
`weight` percent of requests (`canary`) or, at 0 (`shadow`), a mirrored
copy of every request whose answer is compared with the stable one's and
never returned. Each `set` is appended to `history.log` in the state dir.
With `--wait-for VERSION`, `set` first waits (up to --wait seconds, else
fails and changes nothing) until the backend's `/healthz` names that model
version, so no request reaches a server still loading the release.

`serve` forwards every request to a backend and exports, per backend, in
the Prometheus text format at `/metrics` (counts since the routes last
changed, so a new candidate starts clean):

    router_requests{backend="candidate"}      requests answered
    router_errors{backend="candidate"}        5xx answers or no answer
    router_error_ratio{backend="candidate"}   errors / requests
    router_shadow_disagreement_ratio          mirrored answers that differ
    router_weight                             the candidate's percent

followed by the stable backend's own `/metrics`, unchanged, when it answers
in the Prometheus text format (`text/plain`): scraping the router is
scraping the live model (its `model_error_ratio`, ...), so one address
serves the traffic and the monitor's metrics. The candidate's own metrics
are on its backend.
"""

import argparse
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROUTES = "routes.json"


def read_routes(state_dir):
    try:
        with open(os.path.join(state_dir, ROUTES)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"stable": None, "candidate": None, "weight": 0, "mode": "full"}


def wait_for_version(url, version, limit):
    """Waits until `url`/healthz answers with `version` loaded."""
    deadline = time.monotonic() + limit
    seen = "no answer"
    while True:
        status, body = forward(url, "GET", "/healthz", None, {})
        try:
            seen = json.loads(body).get("model_version") or f"HTTP {status}"
        except ValueError:
            seen = f"HTTP {status}"
        if status == 200 and seen == version:
            return
        if time.monotonic() >= deadline:
            raise SystemExit(
                f"router: {url} did not serve {version} within {limit:g}s (it serves: {seen}); "
                "routes unchanged")
        time.sleep(0.2)


def set_route(state_dir, url, weight, mode):
    os.makedirs(state_dir, exist_ok=True)
    routes = read_routes(state_dir)
    if weight >= 100:
        routes = {"stable": url, "candidate": None, "weight": 0, "mode": "full"}
    else:
        if not routes.get("stable"):
            raise SystemExit("router: nothing is stable yet; deploy the first release at 100")
        routes.update({"candidate": url, "weight": weight, "mode": mode})
    routes["changed"] = time.time()
    tmp = os.path.join(state_dir, ROUTES + ".tmp")
    with open(tmp, "w") as f:
        json.dump(routes, f)
    os.replace(tmp, os.path.join(state_dir, ROUTES))
    with open(os.path.join(state_dir, "history.log"), "a") as f:
        f.write(f"{weight} {mode} {url}\n")
    print(f"router: {url} at {weight}% ({mode}); stable {routes['stable']}")


class Counts:
    """Per-backend counts since the routes last changed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.changed = None
        self.reset()

    def reset(self):
        self.requests = {"stable": 0, "candidate": 0}
        self.errors = {"stable": 0, "candidate": 0}
        self.mirrored = 0
        self.disagreed = 0

    def follow(self, routes):
        with self.lock:
            if routes.get("changed") != self.changed:
                self.changed = routes.get("changed")
                self.reset()


def forward(url, method, path, body, headers):
    request = urllib.request.Request(url.rstrip("/") + path, data=body, method=method)
    for name in ("Content-Type", "Accept"):
        if headers.get(name):
            request.add_header(name, headers[name])
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 502, b"no answer from backend\n"


def make_server(port, state_dir):
    """The router's HTTP server on 127.0.0.1:`port` (0: any free port)."""
    counts = Counts()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body, content_type="application/octet-stream"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/metrics":
                return self.metrics()
            self.route("GET")

        def do_POST(self):
            self.route("POST")

        def metrics(self):
            routes = read_routes(state_dir)
            counts.follow(routes)
            lines = [
                "# TYPE router_weight gauge",
                f"router_weight {routes.get('weight', 0)}",
            ]
            with counts.lock:
                for name in ("requests", "errors"):
                    lines.append(f"# TYPE router_{name} gauge")
                    for backend, n in getattr(counts, name).items():
                        lines.append(f'router_{name}{{backend="{backend}"}} {n}')
                lines.append("# TYPE router_error_ratio gauge")
                for backend, n in counts.requests.items():
                    if n:
                        ratio = counts.errors[backend] / n
                        lines.append(f'router_error_ratio{{backend="{backend}"}} {ratio}')
                if counts.mirrored:
                    lines.append("# TYPE router_shadow_disagreement_ratio gauge")
                    ratio = counts.disagreed / counts.mirrored
                    lines.append(f"router_shadow_disagreement_ratio {ratio}")
            text = "\n".join(lines) + "\n"
            if routes.get("stable"):
                text += live_metrics(routes["stable"])
            self.reply(200, text.encode(), "text/plain; version=0.0.4")

        def route(self, method):
            routes = read_routes(state_dir)
            counts.follow(routes)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            stable, candidate = routes.get("stable"), routes.get("candidate")
            if not stable:
                return self.reply(503, b"nothing deployed\n")
            mode, weight = routes.get("mode"), routes.get("weight", 0)
            backend = "stable"
            if candidate and mode == "canary" and random.uniform(0, 100) < weight:
                backend = "candidate"
            url = candidate if backend == "candidate" else stable
            status, answer = forward(url, method, self.path, body, self.headers)
            with counts.lock:
                counts.requests[backend] += 1
                counts.errors[backend] += status >= 500
            if candidate and mode == "shadow":
                shadow_status, shadow_answer = forward(candidate, method, self.path, body, self.headers)
                with counts.lock:
                    counts.mirrored += 1
                    counts.requests["candidate"] += 1
                    counts.errors["candidate"] += shadow_status >= 500
                    counts.disagreed += (shadow_status, shadow_answer) != (status, answer)
            self.reply(status, answer)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def live_metrics(url):
    """The backend's /metrics text if it answers one in the Prometheus text
    format, else "" (a backend without metrics adds nothing)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=2) as response:
            if not response.headers.get("Content-Type", "").startswith("text/plain"):
                return ""
            return response.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""


def serve(port, state_dir):
    server = make_server(port, state_dir)
    print(f"router on http://127.0.0.1:{port}, routes in {state_dir}", flush=True)
    server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_args = commands.add_parser("serve")
    serve_args.add_argument("--port", type=int, default=9100)
    serve_args.add_argument("--state-dir", required=True)
    set_args = commands.add_parser("set")
    set_args.add_argument("--state-dir", required=True)
    set_args.add_argument("--url", required=True)
    set_args.add_argument("--weight", type=int, default=100)
    set_args.add_argument("--mode", default="full")
    set_args.add_argument("--wait-for", metavar="VERSION",
                          help="first wait until the backend's /healthz names this version")
    set_args.add_argument("--wait", type=float, default=30, help="seconds --wait-for waits")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port, args.state_dir)
    else:
        if args.wait_for:
            wait_for_version(args.url, args.wait_for, args.wait)
        set_route(args.state_dir, args.url, args.weight, args.mode)


if __name__ == "__main__":
    main()
