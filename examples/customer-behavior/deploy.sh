#!/bin/sh
# Installs a trained model into an environment's serving directory and makes
# it live, or - during a canary - serves it beside the live one and tells the
# router how much traffic it gets. A running `serve.py --env-dir` on that
# directory reloads within a second. POSIX sh plus coreutils (sha256sum, cmp,
# mv -T); python3 (standard library) only to call router.py when a router is
# configured.
#
# usage: ./deploy.sh ENV [MODEL_DIR]     (MODEL_DIR defaults to build/model)
#
#   ${KILN_SERVE_ROOT:-/tmp/kiln-serve}/ENV/
#     releases/VERSION-NAME/{model.pkl,model.json,VERSION}   one per model
#     current -> releases/VERSION-NAME                        the live one
#     candidate -> releases/VERSION-NAME                      during a canary
#     router/                                                 router.py's state
#     deployments.log                                         what happened when
#
# VERSION-NAME is model.json's "version" (the training run and a digest of the
# model), so re-deploying the same artifacts - a retry, a canary's next step,
# or Kiln's rollback to the previous release - reuses its directory. A switch
# is a rename of a new symlink over `current` (or `candidate`), which is
# atomic: a server never sees half a release. Running it twice changes nothing
# the second time. The newest KILN_KEEP_RELEASES (default 10) releases are
# kept, never the live one or the candidate.
#
# Progressive delivery: Kiln gives each deploy KILN_TRAFFIC_WEIGHT (percent
# of traffic for this release) and KILN_TRAFFIC_MODE (canary, shadow, full);
# without them it is 100, full. With STABLE_BACKEND set (the URL of the
# server on `current`), the router in ROUTER_STATE_DIR (default ENV/router)
# is told where traffic goes:
#   - below 100: `candidate` -> this release, served by the server at
#     CANDIDATE_BACKEND, which gets that share (or, at 0, a mirrored copy)
#     as soon as it serves this version (up to 30 s, else the deploy fails);
#   - at 100: `current` -> this release, `candidate` removed, and the router
#     sends everything to STABLE_BACKEND (a promotion, or the previous release
#     restored by an abort or a rollback).
set -eu

usage="usage: deploy.sh ENV [MODEL_DIR]"
env_name=${1:?$usage}
model_dir=${2:-build/model}
root=${KILN_SERVE_ROOT:-/tmp/kiln-serve}
keep=${KILN_KEEP_RELEASES:-10}
weight=${KILN_TRAFFIC_WEIGHT:-100}
mode=${KILN_TRAFFIC_MODE:-full}
here=$(cd "$(dirname "$0")" && pwd)

say() { printf 'deploy: %s\n' "$*"; }
die() { printf 'deploy: error: %s\n' "$*" >&2; exit 1; }

case $env_name in
  *[!A-Za-z0-9_-]* | -*) die "environment name '$env_name' must be letters, digits, - or _" ;;
esac
case $keep in
  '' | *[!0-9]* | 0) die "KILN_KEEP_RELEASES must be a positive integer, got '$keep'" ;;
esac
case $weight in
  '' | *[!0-9]*) die "KILN_TRAFFIC_WEIGHT must be a percent from 0 to 100, got '$weight'" ;;
esac
[ "$weight" -le 100 ] || die "KILN_TRAFFIC_WEIGHT must be a percent from 0 to 100, got '$weight'"
if [ "$weight" -lt 100 ] && { [ -z "${STABLE_BACKEND:-}" ] || [ -z "${CANDIDATE_BACKEND:-}" ]; }; then
  die "a $mode step at $weight% needs a router: set STABLE_BACKEND and CANDIDATE_BACKEND (see the top of deploy.sh)"
fi
for file in model.pkl model.json; do
  [ -s "$model_dir/$file" ] || die "$model_dir/$file is missing (run the train stage first)"
done

model_sha=$(sha256sum "$model_dir/model.pkl" | cut -d' ' -f1)
version=$(sed -n 's/^ *"version": *"\([A-Za-z0-9._-]*\)".*$/\1/p' "$model_dir/model.json" | head -n 1)
[ -n "$version" ] || version="sha-$(printf '%s' "$model_sha" | cut -c1-12)"

env_dir=$root/$env_name
releases=$env_dir/releases
target=$releases/$version
mkdir -p "$releases"

same_release() {
  cmp -s "$model_dir/model.pkl" "$1/model.pkl" && cmp -s "$model_dir/model.json" "$1/model.json"
}

if [ -d "$target" ]; then
  same_release "$target" || die "$target exists with different content; refusing to overwrite it"
  say "release $version is already installed in $target"
else
  tmp=$releases/.incoming-$version-$$
  rm -rf "$tmp"
  mkdir "$tmp"
  cp "$model_dir/model.pkl" "$model_dir/model.json" "$tmp/"
  {
    printf '%s\n' "$version"
    printf 'model_sha256=%s\n' "$model_sha"
    printf 'installed_at=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'installed_by_run=%s\n' "${KILN_RUN_ID:-local}"
  } >"$tmp/VERSION"
  if mv -T "$tmp" "$target" 2>/dev/null; then
    say "installed release $version (model sha256 $model_sha) into $target"
  else
    # Another deploy of the same model won the race.
    rm -rf "$tmp"
    same_release "$target" || die "$target appeared with different content"
    say "release $version was installed concurrently into $target"
  fi
fi

if grep -q '"demo_fault": *"[a-z]' "$model_dir/model.json"; then
  fault=$(sed -n 's/^ *"demo_fault": *"\([a-z]*\)".*$/\1/p' "$model_dir/model.json" | head -n 1)
  say "WARNING: this model carries DEMO FAULT '$fault': serve.py will deliberately answer wrongly with it"
fi

# Points the symlink $1 (current or candidate) at this release; says so.
switch_link() {
  link_name=$1
  previous=$(readlink "$env_dir/$link_name" 2>/dev/null || true)
  was=${previous#releases/}
  if [ "$previous" = "releases/$version" ]; then
    say "$env_name $link_name already is $version; nothing to switch"
    return
  fi
  link=$env_dir/.$link_name-$$
  rm -f "$link"
  ln -s "releases/$version" "$link"
  mv -T "$link" "$env_dir/$link_name"
  printf '%s %s %s run=%s previous=%s weight=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$env_name" "$version" \
    "${KILN_RUN_ID:-local}" "${was:-none}" "$weight" >>"$env_dir/deployments.log"
  if [ "$link_name" = current ]; then
    say "$env_name now serves $version (was: ${was:-nothing}) - $env_dir/current -> releases/$version"
  else
    say "$env_name candidate is $version (was: ${was:-nothing}) - $env_dir/candidate -> releases/$version"
  fi
}

route() {
  [ -n "${STABLE_BACKEND:-}" ] || return 0
  python3 "$here/router.py" set --state-dir "${ROUTER_STATE_DIR:-$env_dir/router}" "$@"
}

if [ "$weight" -lt 100 ]; then
  switch_link candidate
  # Only once the candidate's server has loaded it: a request sent before
  # would fail and count against the candidate.
  route --url "$CANDIDATE_BACKEND" --weight "$weight" --mode "$mode" --wait-for "$version"
else
  switch_link current
  if [ -L "$env_dir/candidate" ]; then
    rm -f "$env_dir/candidate"
    say "$env_name has no candidate any more"
  fi
  route --url "${STABLE_BACKEND:-}" --weight 100 --mode full
fi

# Prune old releases, never the live one or the candidate. Release names are
# [A-Za-z0-9._-].
live=$(readlink "$env_dir/current" 2>/dev/null || true)
candidate=$(readlink "$env_dir/candidate" 2>/dev/null || true)
# shellcheck disable=SC2012
ls -1t "$releases" | tail -n "+$((keep + 1))" | while read -r old; do
  [ "releases/$old" = "$live" ] || [ "releases/$old" = "$candidate" ] && continue
  rm -rf "${releases:?}/$old"
  say "pruned old release $old"
done
