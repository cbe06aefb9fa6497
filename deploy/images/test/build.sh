#!/bin/sh
# Builds the docker tests' image (default kiln/test-busybox:1) from Debian's
# static busybox, without any registry. A no-op when the image exists.
#
#   apt-get install busybox-static   # provides /bin/busybox
#   deploy/images/test/build.sh [IMAGE]
set -eu

image=${1:-kiln/test-busybox:1}
busybox=${BUSYBOX:-/bin/busybox}
here=$(cd "$(dirname "$0")" && pwd)

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image is already built"
    exit 0
fi
if ! "$busybox" --list >/dev/null 2>&1; then
    echo "no static busybox at $busybox: run 'apt-get install busybox-static' or set BUSYBOX" >&2
    exit 1
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs/bin" "$context/rootfs/tmp"
chmod 1777 "$context/rootfs/tmp"
cp "$busybox" "$context/rootfs/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$context/rootfs/bin/$applet"
done
cp "$here/Dockerfile" "$context/Dockerfile"

echo "building $image from $busybox"
docker build --quiet --tag "$image" "$context"
