#!/usr/bin/env bash
# Kiln against Buildbot 4.3 on the same machine, in the same session: W
# workers/agents that run one build at a time, N no-op builds (`true`)
# submitted at once, builds per second.
#
#   tests/bench/compare-buildbot.sh          # W=4 N=200
#   W=8 N=400 tests/bench/compare-buildbot.sh
#
# Env knobs:
#   W [4], N [200]   workers and builds, for both farms
#   BUILDBOT_PEER [/work/shared/peers/buildbot]   the peer's run.sh and
#                    README (it makes its own venv from PyPI if BB_VENV,
#                    default /tmp/bbvenv, is missing)
#   SKIP_BUILD [0]   1 = use the release binaries as they are
#   TARGET [40]      the ratio Kiln should reach
#
# Prints both summary lines and `ratio kiln/buildbot=..` last. Progress
# goes to stderr.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
W="${W:-4}"
N="${N:-200}"
BUILDBOT_PEER="${BUILDBOT_PEER:-/work/shared/peers/buildbot}"
SKIP_BUILD="${SKIP_BUILD:-0}"
TARGET="${TARGET:-40}"
for v in W N TARGET; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "compare-buildbot.sh: $v must be a number (got '${!v}')" >&2; exit 2; }
done

say() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }
# field NAME LINE: the value of NAME=... in a summary line
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }

cd "$ROOT"
if [[ "$SKIP_BUILD" != 1 ]]; then
  say "building release binaries (kiln-bench starts kiln-coordinator and kiln-agent, and kiln creates the agent token)"
  cargo build --release -p kiln-tests -p kiln-coordinator -p kiln-agent -p kiln-cli >&2
fi

say "kiln: kiln-bench --mode agents --agents $W --runs $N"
KILN_LINE="$("$ROOT/target/release/kiln-bench" --mode agents --agents "$W" --runs "$N" | tail -n 1)"
say "$KILN_LINE"

say "buildbot: $BUILDBOT_PEER/run.sh (W=$W N=$N)"
BB_LINE="$(W="$W" N="$N" "$BUILDBOT_PEER/run.sh" | tail -n 1)"
say "$BB_LINE"

KILN_RATE="$(field runs_per_s "$KILN_LINE")"
BB_RATE="$(field throughput_builds_per_s "$BB_LINE")"
[[ -n "$KILN_RATE" && -n "$BB_RATE" ]] || { say "could not read both rates"; exit 1; }
RATIO="$(awk -v k="$KILN_RATE" -v b="$BB_RATE" 'BEGIN { printf "%.1f", k / b }')"
MET="$(awk -v r="$RATIO" -v t="$TARGET" 'BEGIN { print (r >= t) ? "met" : "not met" }')"

echo "$KILN_LINE"
echo "$BB_LINE"
echo "ratio kiln/buildbot=$RATIO target=${TARGET} $MET"
