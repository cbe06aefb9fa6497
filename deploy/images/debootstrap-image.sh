#!/usr/bin/env bash
# Builds a Docker image from Debian packages without any container registry:
#
#   debootstrap (variant minbase) -> apt-get install PACKAGES in a chroot
#   -> strip caches and docs -> tar | docker import
#
# Only Debian's apt mirror and the local Docker engine are needed. A no-op
# when the image already exists (pass --force to rebuild it).
#
# usage: debootstrap-image.sh [options] IMAGE:TAG [PACKAGE...]
#
#   --suite SUITE          Debian suite (default: bookworm)
#   --mirror URL           Debian mirror (default: $KILN_DEBIAN_MIRROR or
#                          http://deb.debian.org/debian)
#   --security-mirror URL  security mirror, "" for none (default:
#                          $KILN_DEBIAN_SECURITY_MIRROR or
#                          http://deb.debian.org/debian-security)
#   --change INSTRUCTION   Dockerfile instruction for `docker import --change`
#                          (repeatable; ENV PATH and ENV LANG are always set)
#   --stub PACKAGE         satisfy dependencies on PACKAGE with an empty stub
#                          package instead of installing it (repeatable; for
#                          build-time tools that a runtime package depends
#                          on, e.g. python3-pythran pulling in gcc and boost)
#   --strip-python-tests   delete the test suites that Python packages ship
#                          in dist-packages (numpy/tests, pandas/tests, ...)
#   --host-ca              trust the build host's local CAs too (the *.crt in
#                          /usr/local/share/ca-certificates): a proxy that
#                          intercepts TLS on the way out (a company's, or a
#                          sandbox's egress) is then trusted inside the image,
#                          e.g. by pip; needs ca-certificates among PACKAGES
#   --force                rebuild even if IMAGE:TAG exists
#
# The image is labelled with a digest of its recipe (this script, the
# options, the packages and, with --host-ca, those certificates); an image
# with another recipe's label is rebuilt, so a changed recipe reaches a
# machine that built the old one.
#
# Environment: KILN_IMAGE_TMP, else TMPDIR, else /var/tmp is where the root
# filesystem is assembled (the ML image needs about 400 MB there).
# Must run as root (debootstrap and chroot need it); installs debootstrap
# with apt-get when it is missing. Concurrent builds of the same image wait
# for each other, so the second one is a no-op.
set -euo pipefail

suite=bookworm
mirror=${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${KILN_DEBIAN_SECURITY_MIRROR-http://deb.debian.org/debian-security}
changes=()
stubs=()
strip_python_tests=false
host_ca=false
force=false

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

while (($#)); do
  case $1 in
    --suite) suite=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --security-mirror) security_mirror=$2; shift 2 ;;
    --change) changes+=("$2"); shift 2 ;;
    --stub) stubs+=("$2"); shift 2 ;;
    --strip-python-tests) strip_python_tests=true; shift ;;
    --host-ca) host_ca=true; shift ;;
    --force) force=true; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if (($# < 1)); then
  usage >&2
  exit 2
fi
image=$1
shift
packages=("$@")

started=$SECONDS
step() {
  printf '[%s +%ss] %s\n' "$image" "$((SECONDS - started))" "$*"
}

if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  echo "error: cannot reach the Docker engine (is dockerd running, and may $(id -un) use it?)" >&2
  exit 1
fi
# One build per image at a time (flock is in util-linux, part of Debian).
if command -v flock >/dev/null 2>&1; then
  exec 9>"/tmp/kiln-image-${image//[^A-Za-z0-9._-]/_}.lock"
  flock 9
fi
host_cas=()
if $host_ca; then
  shopt -s nullglob
  host_cas=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
fi
recipe=$({
  printf '%s\n' "$suite" "$mirror" "$strip_python_tests" "${packages[@]}" -- "${stubs[@]}" -- "${changes[@]}"
  cat "$0"
  ((${#host_cas[@]} == 0)) || cat "${host_cas[@]}"
} | sha256sum | cut -c1-16)
previous=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
if ! $force && [[ -n $previous ]]; then
  built=$(docker image inspect --format '{{index .Config.Labels "io.kiln.recipe"}}' "$image")
  if [[ $built == "$recipe" ]]; then
    step "already exists ($previous); nothing to do (--force rebuilds it)"
    exit 0
  fi
  step "exists with another recipe (${built:-none}, now $recipe): rebuilding"
fi
if ((EUID != 0)); then
  echo "error: building $image needs root (debootstrap and chroot); try: sudo $0 $image ${packages[*]}" >&2
  exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  step "installing debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap debian-archive-keyring >/dev/null
fi

tmp=$(mktemp -d "${KILN_IMAGE_TMP:-${TMPDIR:-/var/tmp}}/kiln-image.XXXXXX")
rootfs=$tmp/rootfs
cleanup() {
  local status=$? target
  # Whatever is still mounted inside (our /proc, or debootstrap's own mounts
  # after an interruption), innermost first.
  awk -v root="$rootfs" '$2 == root || index($2, root "/") == 1 { print $2 }' /proc/self/mounts |
    sort -r | while read -r target; do
    umount "$target" 2>/dev/null || umount -l "$target" || true
  done
  # --one-file-system: never follow a mount that is still there into the host.
  rm -rf --one-file-system "$tmp" || echo "warning: could not remove $tmp" >&2
  if ((status != 0)); then
    echo "[$image] failed after $((SECONDS - started))s" >&2
  fi
}
trap cleanup EXIT

keyring=()
if [[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]]; then
  keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
fi

step "debootstrap --variant=minbase $suite from $mirror into $rootfs"
debootstrap --variant=minbase "${keyring[@]}" "$suite" "$rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 || {
  tail -n 30 "$tmp/debootstrap.log" >&2
  exit 1
}

step "configuring apt and dpkg inside the root filesystem"
# Future installs in the image skip docs too; copyright files stay.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/90kiln-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
cat >"$rootfs/etc/apt/apt.conf.d/90kiln-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
rm -f "$rootfs/etc/apt/sources.list"
{
  printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$mirror" "$suite" "$suite"
  if [[ -n $security_mirror ]]; then
    printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$security_mirror" "$suite"
  fi
} >"$rootfs/etc/apt/sources.list.d/debian.sources"
# No service may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod 755 "$rootfs/usr/sbin/policy-rc.d"
cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
mount -t proc proc "$rootfs/proc"

in_root() {
  chroot "$rootfs" /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

step "apt-get update (+ security updates) inside the root filesystem"
if ! { in_root apt-get update -qq && in_root apt-get -y -qq -o Dpkg::Use-Pty=0 dist-upgrade; } >"$tmp/apt.log" 2>&1; then
  tail -n 30 "$tmp/apt.log" >&2
  exit 1
fi
for stub in "${stubs[@]}"; do
  step "stub package in place of $stub"
  mkdir -p "$tmp/stub-$stub/DEBIAN"
  cat >"$tmp/stub-$stub/DEBIAN/control" <<CONTROL
Package: kiln-stub-$stub
Version: 1.0
Architecture: all
Maintainer: Kiln <kiln@localhost>
Provides: $stub
Conflicts: $stub
Description: empty stand-in for $stub
 Installed by deploy/images/debootstrap-image.sh so that packages which
 depend on $stub do not pull it in; nothing in this image uses it at run time.
CONTROL
  if ! { dpkg-deb --root-owner-group -b "$tmp/stub-$stub" "$rootfs/tmp/stub-$stub.deb" &&
    in_root dpkg -i "/tmp/stub-$stub.deb"; } >"$tmp/stub.log" 2>&1; then
    cat "$tmp/stub.log" >&2
    exit 1
  fi
done
if ((${#packages[@]})); then
  step "installing ${#packages[@]} packages: ${packages[*]}"
  if ! in_root apt-get install -y -qq -o Dpkg::Use-Pty=0 "${packages[@]}" >"$tmp/install.log" 2>&1; then
    tail -n 30 "$tmp/install.log" >&2
    exit 1
  fi
  step "$(grep -c '^Setting up ' "$tmp/install.log" || true) packages set up"
fi

if ((${#host_cas[@]})); then
  step "trusting the build host's ${#host_cas[@]} local CA certificates"
  if [[ ! -x $rootfs/usr/sbin/update-ca-certificates ]]; then
    echo "error: --host-ca needs the ca-certificates package among the image's packages" >&2
    exit 1
  fi
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  cp "${host_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
  if ! in_root update-ca-certificates >"$tmp/ca.log" 2>&1; then
    cat "$tmp/ca.log" >&2
    exit 1
  fi
fi

step "stripping caches, docs and logs"
in_root apt-get clean
umount "$rootfs/proc"
rm -f "$rootfs/usr/sbin/policy-rc.d"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old \
  "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/var/tmp/* "$rootfs"/root/.cache \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/groff/* \
  "$rootfs"/usr/share/lintian/* "$rootfs"/usr/share/linda/* "$rootfs"/usr/share/locale/*
find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
if $strip_python_tests; then
  # Test suites of the libraries themselves (numpy/tests, pandas/tests,
  # scipy/*/tests, sklearn/*/tests): not importable API, a large share of
  # the size. Helpers such as numpy.testing and pandas._testing stay.
  find "$rootfs/usr/lib/python3/dist-packages" -depth -type d -name tests \
    -exec rm -rf {} + 2>/dev/null || true
fi
# Docker provides these at run time; the build host's must not leak in.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/machine-id"
rm -f "$rootfs/etc/hostname"
mkdir -p "$rootfs/workspace"
step "root filesystem is $(du -sh --one-file-system "$rootfs" | cut -f1)"

step "docker import -> $image"
import_changes=(
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  --change 'ENV LANG=C.UTF-8'
  --change "LABEL org.opencontainers.image.title=\"$image\""
  --change "LABEL io.kiln.recipe=$recipe"
  --change "LABEL org.opencontainers.image.description=\"Debian $suite minbase + ${packages[*]:-nothing}, built offline by deploy/images/debootstrap-image.sh\""
)
for change in "${changes[@]}"; do
  import_changes+=(--change "$change")
done
tar --numeric-owner --xattrs -C "$rootfs" -c . |
  docker import "${import_changes[@]}" \
    --message "debootstrap $suite minbase + ${packages[*]:-nothing}" - "$image" >/dev/null
current=$(docker image inspect --format '{{.Id}}' "$image")
if [[ -n $previous && $previous != "$current" ]]; then
  # The replaced image would linger untagged; drop it unless still in use.
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
step "done: $image $(docker image inspect --format '{{.Id}} {{.Size}}' "$image" |
  awk '{printf "%s, %.0f MB", $1, $2 / 1e6}') in $((SECONDS - started))s"
