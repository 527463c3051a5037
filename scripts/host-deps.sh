#!/bin/sh
# Install the Debian packages the embedded builders need on the host, only those missing.
# Idempotent and quick when everything is there (one dpkg-query, no apt). Needs root
# (or sudo) only when something must be installed.
#
#   make, gcc-12       kernel modules: Debian's headers ask for gcc-12 by name
#                      (6.12: x86_64-linux-gnu-gcc-12, also in gcc-12)
#   libelf1 libssl3    run-time libraries of the prebuilt kbuild tools shipped in the
#   zlib1g             bundles (modpost, objtool, resolve_btfids, sign-file)
#   pahole             (Debian dwarves): 6.12 bundles carry vmlinux, so kbuild adds BTF to every
#                      module and fails with "pahole: not found" without it
#   kmod               modinfo, to read a module's vermagic
#   clang llvm         eBPF probes (clang -target bpf; llvm-strip)
#   libbpf-dev         bpf/bpf_helpers.h for the eBPF probes
set -eu

PACKAGES="make gcc-12 libelf1 libssl3 zlib1g pahole kmod clang llvm libbpf-dev"

missing=""
for p in $PACKAGES; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = installed ] || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

echo "host-deps: installing$missing" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086  # word splitting of the package list is intended
$SUDO apt-get install -y -qq --no-install-recommends $missing
