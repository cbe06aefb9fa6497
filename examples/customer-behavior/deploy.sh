#!/bin/sh
# Installs a trained model into an environment's serving directory and makes
# it live; a running `serve.py --env-dir` on that directory reloads it within
# a second. POSIX sh plus coreutils (sha256sum, cmp, mv -T): no Python, so it
# runs on a deploy host with Kiln's process executor.
#
# usage: ./deploy.sh ENV [MODEL_DIR]     (MODEL_DIR defaults to build/model)
#
#   ${KILN_SERVE_ROOT:-/tmp/kiln-serve}/ENV/
#     releases/VERSION-NAME/{model.pkl,model.json,VERSION}   one per model
#     current -> releases/VERSION-NAME                        the live one
#     deployments.log                                         what happened when
#
# VERSION-NAME is model.json's "version" (the training run and a digest of the
# model), so re-deploying the same artifacts - a retry, or Kiln's rollback to
# the previous release - reuses its directory. The switch is a rename of a new
# symlink over `current`, which is atomic: the server never sees half a
# release. Running it twice changes nothing the second time. The newest
# KILN_KEEP_RELEASES (default 10) releases are kept.
set -eu

usage="usage: deploy.sh ENV [MODEL_DIR]"
env_name=${1:?$usage}
model_dir=${2:-build/model}
root=${KILN_SERVE_ROOT:-/tmp/kiln-serve}
keep=${KILN_KEEP_RELEASES:-10}

say() { printf 'deploy: %s\n' "$*"; }
die() { printf 'deploy: error: %s\n' "$*" >&2; exit 1; }

case $env_name in
  *[!A-Za-z0-9_-]* | -*) die "environment name '$env_name' must be letters, digits, - or _" ;;
esac
case $keep in
  '' | *[!0-9]* | 0) die "KILN_KEEP_RELEASES must be a positive integer, got '$keep'" ;;
esac
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

previous=$(readlink "$env_dir/current" 2>/dev/null || true)
was=${previous#releases/}
if [ "$previous" = "releases/$version" ]; then
  say "$env_name already serves $version; nothing to switch"
else
  link=$env_dir/.current-$$
  rm -f "$link"
  ln -s "releases/$version" "$link"
  mv -T "$link" "$env_dir/current"
  printf '%s %s %s run=%s previous=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$env_name" "$version" \
    "${KILN_RUN_ID:-local}" "${was:-none}" >>"$env_dir/deployments.log"
  say "$env_name now serves $version (was: ${was:-nothing}) - $env_dir/current -> releases/$version"
fi

# Prune old releases, never the live one. Release names are [A-Za-z0-9._-].
live=$(readlink "$env_dir/current")
# shellcheck disable=SC2012
ls -1t "$releases" | tail -n "+$((keep + 1))" | while read -r old; do
  [ "releases/$old" = "$live" ] && continue
  rm -rf "${releases:?}/$old"
  say "pruned old release $old"
done
