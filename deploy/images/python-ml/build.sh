#!/usr/bin/env bash
# Builds kiln/python-ml:bookworm offline: Debian bookworm (minbase) with
# Python 3, numpy, pandas, scikit-learn and pytest from Debian's packages,
# and venv (with its bundled pip) for what a project installs on top from
# PyPI: the example's unit-tests stage builds a virtualenv from its
# requirements-test.txt and keeps it as a stage cache. The build host's
# local CAs are trusted too (--host-ca), so pip works behind a proxy that
# intercepts TLS. The image the ML example and the demo run their stages in.
#
# usage: deploy/images/python-ml/build.sh [--force] [IMAGE:TAG]
# A no-op when the image exists; see ../debootstrap-image.sh for the options
# and environment (mirror, temp dir).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

force=()
if [[ ${1:-} == --force ]]; then
  force=(--force)
  shift
fi
image=${1:-kiln/python-ml:bookworm}

# python3-scipy (pulled in by scikit-learn) depends on the pythran compiler,
# which drags in gcc, g++, boost and the openblas headers (~500 MB); scipy
# never imports it at run time, so an empty stub stands in for it.
exec "$here/../debootstrap-image.sh" "${force[@]}" \
  --stub python3-pythran \
  --strip-python-tests \
  --host-ca \
  --change 'WORKDIR /workspace' \
  --change 'ENV PYTHONUNBUFFERED=1' \
  --change 'CMD ["/bin/sh"]' \
  "$image" \
  ca-certificates python3 python-is-python3 python3-numpy python3-pandas \
  python3-sklearn python3-pytest python3-venv
