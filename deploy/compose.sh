#!/usr/bin/env bash
# Compose for deploy/docker-compose.yml, with the host prepared and its own
# wait, so it works the same with Debian's docker-compose 1.29 (which has no
# `up --wait`) and with Compose v2 (`docker compose`, preferred when present).
#
# usage: deploy/compose.sh up -d | ps | logs [-f] | down [-v] | COMPOSE-ARGS...
#
# `up` first makes the agents' work dirs (owned by the agents' uid, 10001)
# and sets DOCKER_GID to the Docker socket's group; it starts the
# coordinator, waits until it is healthy, and checks the agents' token with
# it: a missing token, or one the coordinator refuses (its volume was
# removed by `down -v`, or the token revoked), is replaced by a new one
# before any agent starts. `up -d` then waits until the coordinator lists
# every agent as connected (KILN_COMPOSE_WAIT seconds, default 120), and
# fails with the services' recent logs when it does not. `down -v` (or
# --volumes) also removes the token file: it belonged to the coordinator
# whose data went with the volume.
#
# Environment: KILN_TAG (image tag, default dev), KILN_REPOS (host dir of
# local repositories, mounted read-only at the same path; default
# /srv/kiln/repos), KILN_GRPC_PORT / KILN_HTTP_PORT (on 127.0.0.1; default
# 7700 / 7701), KILN_AGENT_DIR_PREFIX (agents' work dirs are PREFIX-1 and
# PREFIX-2; default /var/lib/kiln-agent), DOCKER_HOST_SOCKET (default
# /var/run/docker.sock), KILN_AGENT_TOKEN_HOST_FILE (the agents' token;
# default /etc/kiln/agent.token), COMPOSE_PROJECT_NAME (default kiln).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

socket=${DOCKER_HOST_SOCKET:-/var/run/docker.sock}
if [[ ! -S $socket ]]; then
  echo "error: no Docker socket at $socket" >&2
  exit 1
fi
DOCKER_GID=$(stat -c %g "$socket")
export DOCKER_GID
export KILN_REPOS=${KILN_REPOS:-/srv/kiln/repos}
export KILN_AGENT_DIR_PREFIX=${KILN_AGENT_DIR_PREFIX:-/var/lib/kiln-agent}
token_file=${KILN_AGENT_TOKEN_HOST_FILE:-/etc/kiln/agent.token}
export KILN_AGENT_TOKEN_HOST_FILE=$token_file
wait_limit=${KILN_COMPOSE_WAIT:-120}

sudo=()
if ((EUID != 0)); then sudo=(sudo); fi

if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "error: neither 'docker compose' (v2) nor docker-compose is installed" \
    "(Debian: apt-get install docker-compose)" >&2
  exit 1
fi
compose+=(-p "${COMPOSE_PROJECT_NAME:-kiln}" -f "$here/docker-compose.yml")

# The coordinator container's health as Docker reports it: starting,
# healthy, unhealthy, or the container's state when it is not running.
coordinator_health() {
  local id
  id=$("${compose[@]}" ps -q coordinator 2>/dev/null || true)
  if [[ -z $id ]]; then
    echo missing
    return
  fi
  docker inspect -f '{{if .State.Running}}{{if .State.Health}}{{.State.Health.Status}}{{else}}running{{end}}{{else}}{{.State.Status}}{{end}}' "$id"
}

# Fails with the services' recent logs.
give_up() {
  echo "error: $*" >&2
  "${compose[@]}" logs --tail 30 >&2 || true
  exit 1
}

wait_for_coordinator() {
  local deadline=$((SECONDS + wait_limit)) health
  while health=$(coordinator_health) && [[ $health != healthy ]]; do
    if ((SECONDS > deadline)); then
      give_up "the coordinator is not healthy after ${wait_limit}s (it is $health)"
    fi
    sleep 1
  done
}

# `kiln ARGS` inside the coordinator container, as its bootstrap admin.
kiln_in_coordinator() {
  "${compose[@]}" exec -T coordinator kiln "$@"
}

# The token in $token_file, if the coordinator accepts it.
token_accepted() {
  [[ -s $token_file ]] || return 1
  "${sudo[@]}" cat "$token_file" |
    "${compose[@]}" exec -T coordinator kiln whoami --token-file /dev/stdin >/dev/null 2>&1
}

agent_services() {
  "${compose[@]}" config --services | grep '^agent-'
}

ensure_agent_token() {
  if token_accepted; then
    return
  fi
  if [[ -s $token_file ]]; then
    echo "the coordinator refuses the agents' token in $token_file (its data was removed?); replacing it"
  fi
  # An agent reads its token once, at start: running ones must start again.
  mapfile -t agents < <(agent_services)
  "${compose[@]}" rm -s -f "${agents[@]}" >/dev/null 2>&1 || true
  local token
  token=$(kiln_in_coordinator token create "compose-agents-$(date +%s)" --role agent)
  "${sudo[@]}" install -d -m 0755 "$(dirname "$token_file")"
  # Written in place (same inode), so a bind mount of the file sees it.
  (umask 077 && printf '%s\n' "$token" | "${sudo[@]}" tee "$token_file" >/dev/null)
  "${sudo[@]}" chown 10001:10001 "$token_file"
  echo "created the agents' token in $token_file"
}

wait_for_agents() {
  local expected connected deadline=$((SECONDS + wait_limit))
  expected=$(agent_services | wc -l)
  while :; do
    connected=$(kiln_in_coordinator agents --output json 2>/dev/null |
      grep -o '"state": *"connected"' | wc -l || true)
    if ((connected >= expected)); then
      echo "the coordinator is healthy and $connected agent(s) are connected"
      return
    fi
    if ((SECONDS > deadline)); then
      give_up "$connected of $expected agents connected after ${wait_limit}s"
    fi
    sleep 1
  done
}

case ${1:-} in
  up)
    for image in "kiln/coordinator:${KILN_TAG:-dev}" "kiln/agent:${KILN_TAG:-dev}"; do
      if ! docker image inspect "$image" >/dev/null 2>&1; then
        echo "error: $image is missing; build it with deploy/build-images.sh" >&2
        exit 1
      fi
    done
    for dir in "$KILN_AGENT_DIR_PREFIX-1" "$KILN_AGENT_DIR_PREFIX-2"; do
      if [[ ! -d $dir || $(stat -c %u "$dir") != 10001 ]]; then
        echo "creating $dir (owner 10001:10001)"
        "${sudo[@]}" install -d -o 10001 -g 10001 -m 0750 "$dir"
      fi
    done
    if [[ ! -d $KILN_REPOS ]]; then
      echo "creating $KILN_REPOS (put repositories to build here)"
      "${sudo[@]}" install -d -m 0755 "$KILN_REPOS"
    fi
    # The agents' token file is mounted into them, so it must exist first.
    if [[ ! -e $token_file ]]; then
      "${sudo[@]}" install -d -m 0755 "$(dirname "$token_file")"
      "${sudo[@]}" install -m 0600 -o 10001 -g 10001 /dev/null "$token_file"
    fi
    "${compose[@]}" up -d coordinator
    wait_for_coordinator
    ensure_agent_token
    detached=false
    for arg in "${@:2}"; do
      if [[ $arg == -d || $arg == --detach ]]; then detached=true; fi
    done
    if ! $detached; then
      exec "${compose[@]}" "$@"
    fi
    "${compose[@]}" "$@"
    wait_for_coordinator
    wait_for_agents
    ;;
  down)
    "${compose[@]}" "$@"
    for arg in "${@:2}"; do
      if [[ $arg == -v || $arg == --volumes ]]; then
        "${sudo[@]}" rm -f "$token_file"
        echo "removed $token_file (its coordinator's data is gone)"
      fi
    done
    ;;
  *)
    exec "${compose[@]}" "$@"
    ;;
esac
