#!/usr/bin/env bash
# Installs and builds everything Kiln's test suite needs, so that
# `cargo test --workspace` runs every test instead of skipping some:
#
#   Debian packages   git (test repositories, agent checkouts), python3 (the
#                     ML example's live-acceptance stage runs on the host),
#                     busybox-static
#                     (the docker tests' image), debootstrap (kiln/base and
#                     kiln/python-ml), shellcheck (deploy scripts),
#                     ca-certificates, openssl (deploy/tls/dev-certs.sh),
#                     prometheus with promtool and prometheus-alertmanager
#                     (delivery I/O and rule tests), docker-compose (the
#                     compose test), systemd (systemd-analyze verify),
#                     chromium and chromium-driver (the dashboard's browser
#                     tests)
#   offline images    kiln/test-busybox:1, kiln/base:bookworm,
#                     kiln/python-ml:bookworm (deploy/images/*/build.sh)
#
# The README's test command and .ci/run both call it. Idempotent: what is
# present is left alone, so a second run takes a few seconds. Packages are
# installed with apt-get (as root, or through sudo); the Docker engine
# itself must already run (Debian: apt-get install docker.io).
#
# usage: tests/setup.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

started=$SECONDS
step() {
  printf '[setup +%ss] %s\n' "$((SECONDS - started))" "$*"
}

sudo=()
if ((EUID != 0)); then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "error: tests/setup.sh installs packages and builds images as root; run it as root or install sudo" >&2
    exit 1
  fi
  sudo=(sudo)
fi

packages=(git python3 busybox-static debootstrap shellcheck ca-certificates openssl
  prometheus prometheus-alertmanager docker-compose systemd chromium chromium-driver)
missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
  if [[ $status != installed ]]; then
    missing+=("$package")
  fi
done
if ((${#missing[@]} > 0)); then
  step "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  step "Debian packages: all ${#packages[@]} installed"
fi

if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  echo "error: no Docker engine answers (docker version failed); install one" \
    "(Debian: apt-get install docker.io) and start it, then run tests/setup.sh again" >&2
  exit 1
fi
step "docker engine $(docker version --format '{{.Server.Version}}')"

# Each builder is a no-op when its image exists.
step "offline images"
"$root/deploy/images/test/build.sh"
"${sudo[@]}" "$root/deploy/images/base/build.sh"
# The ML example's image: the demo test trains the real model in it.
"${sudo[@]}" "$root/deploy/images/python-ml/build.sh"
step "done"
