#!/bin/sh
# The Debian base image the builder images start FROM, made here without any registry:
# debootstrap (minbase) of one Debian release from the Debian mirror this host's apt
# uses, then `podman import`:
#
#   scripts/debian-base-image.sh [SUITE]    bullseye, bookworm (the default), trixie, ...
#
# Cached at both steps, per suite:
#
#   localhost/collector-drivers/debian-base:SUITE
#                                         when it exists there is nothing to do (not even
#                                         a rootfs: a fresh checkout reuses the image)
#   .cache/podman/rootfs-SUITE/           the rootfs; .cache/podman/rootfs-SUITE.done is
#                                         written last, so a half-made rootfs is made again
#
# `podman rmi` the image to import the cached rootfs again; also remove the .done stamp to
# debootstrap afresh (e.g. for newer packages).
#
# Prints the image reference on stdout; progress goes to stderr. Needs root (debootstrap,
# and podman's default root storage). Runs scripts/podman-setup.sh when CONTAINERS_CONF is
# not set.
set -eu

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUITE=${1:-bookworm}
case "$SUITE" in
    *[!a-z]* | "") echo "debian-base-image: not a Debian suite name: '$SUITE'" >&2; exit 2 ;;
esac
ROOTFS="$ROOT/.cache/podman/rootfs-$SUITE"
STAMP="$ROOTFS.done"
IMAGE="localhost/collector-drivers/debian-base:$SUITE"

if [ -z "${CONTAINERS_CONF:-}" ]; then
    eval "$("$ROOT/scripts/podman-setup.sh")"
fi

# The mirror of this host's apt sources (one-line or deb822 format): the first URI of a
# Debian archive, not its security archive. Debian's own when none is configured.
apt_uris() {
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        case "$f" in
            *.sources) awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f" ;;
            *) awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' "$f" ;;
        esac
    done
}
MIRROR=$(apt_uris | grep -E '/debian/?$' | head -n 1)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
MIRROR=${MIRROR%/}
SECURITY=$(apt_uris | grep -E '/debian-security/?$' | head -n 1)
SECURITY=${SECURITY:-http://deb.debian.org/debian-security}
SECURITY=${SECURITY%/}

if podman image exists "$IMAGE"; then
    echo "$IMAGE"
    exit 0
fi

if [ ! -f "$STAMP" ]; then
    if [ -e "$ROOTFS" ]; then
        echo "debian-base-image: removing the unfinished $ROOTFS" >&2
        # An interrupted debootstrap may leave /proc or /sys mounted inside it.
        awk -v root="$ROOTFS/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r mnt; do umount -l "$mnt" || true; done
        rm -rf --one-file-system "$ROOTFS"
    fi
    command -v debootstrap >/dev/null || "$ROOT/scripts/podman-setup.sh" >/dev/null
    echo "debian-base-image: debootstrap $SUITE (minbase) from $MIRROR" >&2
    mkdir -p "$(dirname "$ROOTFS")"
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >&2
    # The same archives as the host: point releases and security updates too (a stable
    # release has both; sid has neither).
    if [ "$SUITE" = sid ] || [ "$SUITE" = unstable ]; then
        echo "deb $MIRROR $SUITE main" >"$ROOTFS/etc/apt/sources.list"
    else
        cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
EOF
    fi
    # No package lists or downloaded .debs in the image: every build runs apt-get update.
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
    printf 'suite=%s\nmirror=%s\ndate=%s\n' "$SUITE" "$MIRROR" "$(date -u +%FT%TZ)" >"$STAMP"
fi

echo "debian-base-image: importing $ROOTFS as $IMAGE" >&2
# Through a file, not a pipe: sh has no pipefail, and a failed tar must fail the import.
TARBALL="$ROOTFS.tar"
trap 'rm -f "$TARBALL"' EXIT
tar --numeric-owner -C "$ROOTFS" -cf "$TARBALL" .
podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    "$TARBALL" "$IMAGE" >&2
echo "$IMAGE"
