#!/usr/bin/env bash
# Builds the Kiln service images from binaries built on this host; no
# registry is involved:
#
#   kiln/base:bookworm     deploy/images/base/build.sh (only when missing)
#   kiln/coordinator:TAG   deploy/Dockerfile.coordinator (kiln-coordinator, kiln)
#   kiln/agent:TAG         deploy/Dockerfile.agent (kiln-agent)
#
# usage: deploy/build-images.sh [debug|release] [TAG]
#   profile  cargo profile whose binaries go in (default: release)
#   TAG      image tag (default: dev)
#
# Environment:
#   KILN_BIN_DIR=DIR   take the binaries from DIR and do not run cargo
#                      (the containerized farm test passes its own)
#   KILN_SKIP_CARGO=1  take them from target/<profile> as they are
# Otherwise `cargo build` runs first (a no-op when up to date). The copies
# in the images have their debug info stripped (symbols stay). The binaries
# link glibc dynamically: build them on Debian bookworm, like the base
# image, or on an older glibc. Unchanged binaries hit the engine's build
# cache; a replaced image is removed so no untagged copies pile up.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

profile=${1:-release}
tag=${2:-dev}
case $profile in
  debug | release) ;;
  *) echo "error: profile must be debug or release, not '$profile'" >&2; exit 2 ;;
esac

started=$SECONDS
step() {
  printf '[build-images +%ss] %s\n' "$((SECONDS - started))" "$*"
}

"$root/deploy/images/base/build.sh"

if [[ -n ${KILN_BIN_DIR:-} ]]; then
  bin=$KILN_BIN_DIR
else
  bin=${CARGO_TARGET_DIR:-$root/target}/$profile
  if [[ ${KILN_SKIP_CARGO:-0} != 1 ]]; then
    step "cargo build ($profile)"
    cargo_args=(build --manifest-path "$root/Cargo.toml" -p kiln-coordinator -p kiln-agent -p kiln-cli)
    if [[ $profile == release ]]; then
      cargo_args+=(--release)
    fi
    cargo "${cargo_args[@]}"
  fi
fi
for binary in kiln-coordinator kiln-agent kiln; do
  if [[ ! -x $bin/$binary ]]; then
    hint="cargo build --workspace"
    if [[ $profile == release ]]; then hint+=" --release"; fi
    echo "error: $bin/$binary is missing; build it first ($hint)" >&2
    exit 1
  fi
done

context=$(mktemp -d "${TMPDIR:-/tmp}/kiln-images.XXXXXX")
trap 'rm -rf "$context"' EXIT

build() { # NAME BINARY...
  local name=$1 image="kiln/$1:$tag" previous current binary
  shift
  rm -rf "${context:?}"/*
  for binary in "$@"; do
    if command -v objcopy >/dev/null 2>&1; then
      objcopy --strip-debug "$bin/$binary" "$context/$binary"
    else
      cp "$bin/$binary" "$context/$binary"
    fi
  done
  previous=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
  step "$image from $bin/{$(IFS=,; echo "$*")}"
  docker build --quiet -f "$root/deploy/Dockerfile.$name" -t "$image" "$context" >/dev/null
  current=$(docker image inspect --format '{{.Id}}' "$image")
  if [[ -n $previous && $previous != "$current" ]]; then
    docker image rm "$previous" >/dev/null 2>&1 || true
  fi
}
build coordinator kiln-coordinator kiln
build agent kiln-agent

step "done: kiln/coordinator:$tag kiln/agent:$tag"
