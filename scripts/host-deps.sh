#!/bin/sh
# Install the Debian packages that building drivers on this host needs, only those missing.
# Idempotent; when everything is there it is one dpkg-query and no apt. Installing needs
# root (or sudo).
#
#   make gcc-12          kernel modules: Debian's header trees ask for gcc-12 by name
#                        (6.12 ones for x86_64-linux-gnu-gcc-12, also in gcc-12)
#   libelf1 libssl3      run-time libraries of the prebuilt kbuild tools inside the bundles
#   zlib1g               (modpost, objtool, resolve_btfids, sign-file)
#   pahole               (Debian's dwarves): 6.12 header trees carry vmlinux, so kbuild adds
#                        BTF to every module and fails with "pahole: not found" without it
#   kmod                 modinfo, to check a module's vermagic
#   clang llvm           eBPF probes: clang -target bpf, llvm-strip
#   libbpf-dev           <bpf/bpf_helpers.h> for the eBPF probes
#   skopeo               the cpaas mirror pod's image copy, run here on OCI archives
#   qemu-system-x86      vm-test: each driver's own kernel booted under software emulation
#   busybox-static       vm-test: the guest's whole userland (insmod, rmmod, sh)
#   gcc libc6-dev cmake  vm-test: its consumer, libscap's scap-open, built from each driver
#   libelf-dev           version's sources and linked statically (libelf, zlib; uthash for
#   zlib1g-dev patch     8.x's libscap); patch applies consumer_patches/ to its build copy
#   uthash-dev
#   docker-compose       the tests validate docker-compose.yaml with Compose itself
#   postgresql           the metadata database of the run through the real scheduler
#   chromium             the coverage page's browser test and benchmark: Debian's headless
#   chromium-driver      chromium, driven by selenium through Debian's chromedriver
#   unzip                the support-package test checks our zip with Info-ZIP's unzip -t
#   cmake                the preparation test compares drivers sources prepare with what
#                        CMake's configure_file writes from the same real trees
# Bundles are made with apt-get download and dpkg-deb, which every Debian system has.
#
# Other scripts install their own packages through it: host-deps.sh [--with-recommends]
# PACKAGE...
set -eu

RECOMMENDS="--no-install-recommends"
if [ "${1:-}" = "--with-recommends" ]; then
    RECOMMENDS=""
    shift
fi
PACKAGES="${*:-make gcc-12 libelf1 libssl3 zlib1g pahole kmod clang llvm libbpf-dev skopeo
    qemu-system-x86 busybox-static gcc libc6-dev cmake libelf-dev zlib1g-dev patch uthash-dev
    docker-compose postgresql chromium chromium-driver unzip}"

# shellcheck disable=SC2086  # the package list is split on purpose
installed=$(dpkg-query -W -f='${db:Status-Status} ${Package}\n' $PACKAGES 2>/dev/null |
    awk '$1 == "installed" { print $2 }')
missing=""
for p in $PACKAGES; do
    echo "$installed" | grep -qx "$p" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

echo "host-deps: installing$missing" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq $RECOMMENDS $missing >&2
