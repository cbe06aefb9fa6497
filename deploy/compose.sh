#!/usr/bin/env bash
# docker-compose for deploy/docker-compose.yml, with the host prepared:
# the agents' work dirs exist at their fixed paths, owned by the agents' uid
# (10001), and DOCKER_GID is the group of the Docker socket.
#
# usage: deploy/compose.sh COMPOSE-ARGS...     e.g. up -d | ps | logs -f | down
# Environment: KILN_TAG (image tag, default dev), KILN_REPOS (host dir of
# local repositories, mounted read-only at the same path; default
# /srv/kiln/repos), KILN_GRPC_PORT / KILN_HTTP_PORT (on 127.0.0.1; default
# 7700 / 7701), DOCKER_HOST_SOCKET (default /var/run/docker.sock),
# KILN_AGENT_TOKEN_HOST_FILE (the agents' token; default
# /etc/kiln/agent.token, created on the first `up` through the coordinator).
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

if [[ ${1:-} == up ]]; then
  for image in "kiln/coordinator:${KILN_TAG:-dev}" "kiln/agent:${KILN_TAG:-dev}"; do
    if ! docker image inspect "$image" >/dev/null 2>&1; then
      echo "error: $image is missing; build it with deploy/build-images.sh" >&2
      exit 1
    fi
  done
  sudo=()
  if ((EUID != 0)); then sudo=(sudo); fi
  for dir in /var/lib/kiln-agent-1 /var/lib/kiln-agent-2; do
    if [[ ! -d $dir || $(stat -c %u "$dir") != 10001 ]]; then
      echo "creating $dir (owner 10001:10001)"
      "${sudo[@]}" install -d -o 10001 -g 10001 -m 0750 "$dir"
    fi
  done
  if [[ ! -d $KILN_REPOS ]]; then
    echo "creating $KILN_REPOS (put repositories to build here)"
    "${sudo[@]}" install -d -m 0755 "$KILN_REPOS"
  fi
fi

if command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  compose=(docker compose)
fi
compose+=(-p "${COMPOSE_PROJECT_NAME:-kiln}" -f "$here/docker-compose.yml")

# The agents authenticate with an agent token: on the first `up`, start the
# coordinator alone and create one with its bootstrap admin token.
token_file=${KILN_AGENT_TOKEN_HOST_FILE:-/etc/kiln/agent.token}
export KILN_AGENT_TOKEN_HOST_FILE=$token_file
if [[ ${1:-} == up && ! -s $token_file ]]; then
  "${compose[@]}" up -d --wait coordinator
  "${sudo[@]}" install -d -m 0755 "$(dirname "$token_file")"
  token=$("${compose[@]}" exec -T coordinator kiln token create "compose-agents-$(date +%s)" --role agent)
  (umask 077 && printf '%s\n' "$token" | "${sudo[@]}" tee "$token_file" >/dev/null)
  "${sudo[@]}" chown 10001:10001 "$token_file"
  echo "created the agents' token in $token_file"
fi
exec "${compose[@]}" "$@"
