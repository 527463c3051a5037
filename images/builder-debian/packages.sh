#!/bin/sh
# The packages of the Debian builder image of one release (images/builder-debian/Dockerfile),
# the one place that says what each release's builder carries: the toolchain that release
# built its kernels with, as that release ships it.
#
#   packages.sh RELEASE            installs them (apt-get; inside the image build)
#   packages.sh RELEASE --list     prints them
#
#   gcc-N            kernel modules: each release's header trees ask for their compiler by
#                    name (CC = gcc-10 in bullseye's 5.10 and 6.1.0-0.deb11 trees, gcc-12
#                    in bookworm's, x86_64-linux-gnu-gcc-12 / -gcc-14 in the 6.12 ones);
#                    gcc, the release's default (the same major), is what a shard reads
#                    as its compiler and what the toolchain guard compares
#   make kmod bc     kbuild; modinfo checks a module's vermagic
#   libelf zlib      run-time libraries of the prebuilt kbuild tools inside the bundles
#   libssl           (modpost, objtool, resolve_btfids, sign-file): the release's sonames
#   pahole           BTF for modules of trees that carry vmlinux (bullseye: dwarves 1.20)
#   clang llvm       eBPF probes: the release's default clang (bullseye 11, bookworm 14,
#                    trixie 19), llc, llvm-strip
#   libbpf-dev       <bpf/bpf_helpers.h> for the eBPF probes
#   python3-venv     the `drivers` package's interpreter (>= 3.11); bullseye ships 3.9, so
#                    its image builds bookworm's python3.11 from source (python.sh) and
#                    needs only that Python's run-time libraries
# The host's own list is scripts/host-deps.sh (it builds and tests on bookworm).
set -eu

RELEASE=${1:?usage: packages.sh RELEASE [--list]}
COMMON="gcc make kmod bc clang llvm zlib1g ca-certificates"
case "$RELEASE" in
    # bullseye's libbpf-dev from the release itself (0.3-2): the archive this machine
    # reaches lists bullseye-security's 0.3-2+deb11u1 but serves no such file (404), and
    # the probes only take its headers.
    bullseye) PACKAGES="$COMMON libbpf-dev/bullseye gcc-10 libelf1 libssl1.1 dwarves
        libffi7 libbz2-1.0 liblzma5" ;;
    bookworm) PACKAGES="$COMMON libbpf-dev gcc-12 libelf1 libssl3 pahole python3 python3-venv" ;;
    trixie) PACKAGES="$COMMON libbpf-dev gcc-14 libelf1t64 libssl3t64 pahole python3 python3-venv" ;;
    *)
        echo "packages.sh: no builder package list for Debian release '$RELEASE'" >&2
        exit 2
        ;;
esac

if [ "${2:-}" = "--list" ]; then
    echo "$PACKAGES"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # the package list is split on purpose
apt-get install -y -qq --no-install-recommends $PACKAGES
apt-get clean
rm -rf /var/lib/apt/lists/*
