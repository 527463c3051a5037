#!/bin/sh
# The Docker API the embedded default's docker runtime drives: podman's, rootful
# (`podman system service`), on a socket in the repo (.cache/podman/podman.sock).
# Idempotent: starts the service only when the socket does not answer, then waits
# until it does; it stays up (`scripts/podman-service.sh stop` ends it).
#
#   scripts/podman-service.sh            # up; prints DOCKER_HOST=unix://...
#   scripts/podman-service.sh stop
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR="$ROOT/.cache/podman"
SOCK="$DIR/podman.sock"
PID="$DIR/podman-service.pid"
LOG="$DIR/podman-service.log"
eval "$("$ROOT/scripts/podman-setup.sh")"   # CONTAINERS_CONF
export CONTAINERS_CONF

answers() { [ -S "$SOCK" ] && podman --url "unix://$SOCK" version >/dev/null 2>&1; }

if [ "${1:-up}" = stop ]; then
    if [ -f "$PID" ] && kill -0 "$(cat "$PID")" 2>/dev/null; then kill "$(cat "$PID")"; fi
    rm -f "$PID" "$SOCK"
    exit 0
fi

mkdir -p "$DIR"
if ! answers; then
    rm -f "$SOCK"
    nohup podman system service --time=0 "unix://$SOCK" >"$LOG" 2>&1 </dev/null &
    echo $! >"$PID"
    i=0
    until answers; do
        i=$((i + 1))
        if [ "$i" -gt 100 ] || ! kill -0 "$(cat "$PID")" 2>/dev/null; then
            echo "podman system service did not answer on $SOCK (log: $LOG):" >&2
            tail -20 "$LOG" >&2
            exit 1
        fi
        sleep 0.2
    done
fi
echo "DOCKER_HOST=unix://$SOCK"
