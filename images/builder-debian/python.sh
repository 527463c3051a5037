#!/bin/sh
# A Python >= 3.11 for the `drivers` package, in the Debian builder image's python stage
# (images/builder-debian/Dockerfile), installed under /usr/local (first on PATH):
#
#   python.sh RELEASE
#
# bookworm (3.11) and trixie (3.13) ship one: nothing to do here (packages.sh installs it).
# bullseye ships 3.9, and no registry but Debian's is reached, so this builds the CPython
# of bookworm's python3.11 source package (Debian's orig tarball, checked by apt) with
# bullseye's own gcc; the final stage copies /usr/local and installs only its run-time
# libraries (packages.sh), no compiler of another release.
set -eu

RELEASE=${1:?usage: python.sh RELEASE}
mkdir -p /usr/local
case "$RELEASE" in
    bookworm | trixie) exit 0 ;;
    bullseye) ;;
    *)
        echo "python.sh: no Python recipe for Debian release '$RELEASE'" >&2
        exit 2
        ;;
esac

SOURCE=python3.11
MIRROR=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list)
echo "deb-src $MIRROR bookworm main" >/etc/apt/sources.list.d/python-source.list
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends dpkg-dev xz-utils gcc make libc6-dev \
    libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev

work=$(mktemp -d)
cd "$work"
apt-get source --download-only -qq "$SOURCE"
tar -xf "$SOURCE"_*.orig.tar.*
cd Python-*/
# No PGO/LTO: minutes, not a quarter hour, for an interpreter that only drives kbuild.
./configure --prefix=/usr/local --without-ensurepip --disable-test-modules >/dev/null
make -j"$(nproc)" >/dev/null
make install >/dev/null
cd /
# (ensurepip stays: `python3 -m venv` seeds each venv's pip from its bundled wheel)
rm -rf "$work" /usr/local/lib/python3.11/test /usr/local/lib/python3.11/idlelib \
    /usr/local/lib/python3.11/tkinter
find /usr/local/lib/python3.11 -name __pycache__ -prune -exec rm -rf {} +
ln -sf python3.11 /usr/local/bin/python3
/usr/local/bin/python3 -c 'import ssl, zlib, bz2, lzma, ctypes, venv; print("python.sh: built", __import__("sys").version.split()[0])'
