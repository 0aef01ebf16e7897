#!/usr/bin/env bash
# Makes sure QEMU (qemu-system-x86_64, qemu-img) is installed. As root it installs Debian's
# packages; otherwise it prints the exact command and fails.
set -euo pipefail
# ovmf: the compatibility tests boot the test guest with UEFI firmware too.
packages="qemu-system-x86 qemu-utils ovmf"
if command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null && [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "ensure-qemu: QEMU is not installed; run: sudo apt-get install -y $packages" >&2
  exit 1
fi
echo "ensure-qemu: installing $packages"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq $packages >/dev/null 2>&1 || {
  apt-get update -qq >/dev/null
  apt-get install -y -qq $packages >/dev/null
}
qemu-system-x86_64 --version | head -1
