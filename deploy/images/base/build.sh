#!/usr/bin/env bash
# Builds kiln/base:bookworm offline: Debian bookworm (minbase) with git,
# ca-certificates and tini. Deploy/Dockerfile.coordinator and
# deploy/Dockerfile.agent start FROM it; the Kiln binaries are built on a
# bookworm host, so they find the same glibc here.
#
# usage: deploy/images/base/build.sh [--force] [IMAGE:TAG]
# A no-op when the image exists; see ../debootstrap-image.sh for the options
# and environment (mirror, temp dir).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

force=()
if [[ ${1:-} == --force ]]; then
  force=(--force)
  shift
fi
image=${1:-kiln/base:bookworm}

exec "$here/../debootstrap-image.sh" "${force[@]}" \
  --change 'CMD ["/bin/sh"]' \
  "$image" \
  ca-certificates git tini passwd
