#!/bin/sh
# Installs what Kiln needs on a fresh Debian/Ubuntu machine: QEMU for the lab
# (used when this host's KVM cannot run a stock kernel natively), dpkg/apt
# tools for building guest images from Debian packages, e2fsprogs for the
# guest ext4 rootfs, iproute2 for TAP devices, util-linux for namespaces,
# erofs-utils for container images' root file systems (`kiln run --image`)
# and umoci to build OCI test images without a registry.
# Then builds the guest images.
set -eu
cd "$(dirname "$0")/.."

need=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || need="$need qemu-system-x86"
command -v dpkg-deb >/dev/null 2>&1 || need="$need dpkg"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v unshare >/dev/null 2>&1 || need="$need util-linux"
command -v lz4 >/dev/null 2>&1 || need="$need lz4"
command -v mkfs.ext4 >/dev/null 2>&1 || [ -x /sbin/mkfs.ext4 ] || [ -x /usr/sbin/mkfs.ext4 ] || need="$need e2fsprogs"
command -v mkfs.erofs >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.erofs ] || need="$need erofs-utils"
command -v umoci >/dev/null 2>&1 || need="$need umoci"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "kiln setup: refreshing the package index (apt-get update)"
$SUDO apt-get update -q >/dev/null
if [ -n "$need" ]; then
    echo "kiln setup: installing$need"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $need >/dev/null
fi

echo "kiln setup: building kiln"
cargo build --release -q -p kiln
echo "kiln setup: building guest images (pinned Debian packages, cached in .cache/)"
./target/release/kiln images
