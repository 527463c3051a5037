#!/bin/sh
# Podman for building and running the builder images on this host (no Docker engine here).
# Idempotent: installs podman, runc and debootstrap only when missing (one dpkg-query when
# everything is there), writes the containers.conf podman needs on this machine, and prints
# the line that points podman at it:
#
#   eval "$(scripts/podman-setup.sh)"      # sets CONTAINERS_CONF
#
# containers.conf (.cache/podman/containers.conf, repo-local):
#   runtime = "runc"          crun is not installed; runc is
#   default_ulimits           this host may not raise limits (no CAP_SYS_RESOURCE), and
#                             podman asks for more than its processes have: nofile
#                             1048576 (the hard limit here is lower) and nproc above the
#                             32768 its conmon runs with. Without both every container
#                             fails with "error setting rlimit type 7 / 6"
# Storage is podman's default (root's /var/lib/containers). Installing needs root (or sudo).
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONF_DIR="$ROOT/.cache/podman"
CONF="$CONF_DIR/containers.conf"
"$ROOT/scripts/host-deps.sh" --with-recommends podman runc debootstrap

# Limits a container may have: at most the hard limits here (and conmon's 32768 processes).
hard_limit() { # NAME CAP: the hard limit whose /proc line starts with NAME, at most CAP
    awk -v name="$1" -v cap="$2" 'index($0, name) == 1 {
        n = split(substr($0, length(name) + 1), f, " ")
        print (f[2] == "unlimited" || f[2] + 0 > cap) ? cap : f[2]
    }' /proc/self/limits
}
nofile=$(hard_limit "Max open files" 1048576)
nproc=$(hard_limit "Max processes" 32768)

mkdir -p "$CONF_DIR"
want=$(printf '%s\n' \
    '# Written by scripts/podman-setup.sh; rewritten when it differs.' \
    '[engine]' \
    'runtime = "runc"' \
    '' \
    '[containers]' \
    "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]")
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$want" ]; then
    printf '%s\n' "$want" >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
fi

echo "export CONTAINERS_CONF=$CONF"
