#!/usr/bin/env bash
# A second QEMU for tests: Debian 13's QEMU (10.x) in a chroot, beside Debian 12's 7.2, so the
# version-dependent paths (QEMU >= 9.0 keeps a paused guest paused and leaves resuming to qsnap)
# run for real. Needs root and Debian's package mirror.
#
#   qemu-chroot.sh setup    DIR WORK   debootstrap into DIR/root once (about 30 s, ~380 MB), then
#                                      mount proc, this checkout (read-only) and WORK (read-write)
#                                      at their own paths inside; prints the QEMU wrapper's path
#   qemu-chroot.sh teardown DIR WORK   unmount everything setup mounted
#
# Paths must be the same for qsnap and for QEMU (disks, sockets, the snapshot file), hence the
# binds at identical paths. /dev is not bound: debootstrap makes its own nodes, so removing DIR
# can never reach the host's devices; the checkout is bound read-only for the same reason.
set -euo pipefail

cmd=${1:?usage: qemu-chroot.sh setup|teardown DIR WORK}
dir=$(realpath -m "${2:?DIR}")
work=$(realpath -m "${3:?WORK}")
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=$dir/root
# A worktree may link images/build to another checkout's: QEMU must see the real directory.
images=$(realpath -m "$repo/images/build")
case "$images" in "$repo"/*) images= ;; esac
mirror=${QSNAP_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "qemu-chroot: $*" >&2; }

unmount_all() {
  for target in "$root$work" ${images:+"$root$images"} "$root$repo" "$root/proc"; do
    if mountpoint -q "$target" 2>/dev/null; then umount "$target" || umount -l "$target"; fi
  done
}

case "$cmd" in
  setup)
    [ "$(id -u)" = 0 ] || { say "needs root (debootstrap, chroot, mount)"; exit 1; }
    if [ ! -x "$root/usr/bin/qemu-system-x86_64" ]; then
      command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
      rm -rf "$root.partial"
      say "debootstrap trixie with qemu-system-x86 into $root"
      debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils trixie "$root.partial" "$mirror" >"$dir.log" 2>&1 ||
        { say "debootstrap failed, see $dir.log"; exit 1; }
      mv "$root.partial" "$root"
    fi
    mkdir -p "$work" "$root$work" "$root$repo" "$root/proc"
    mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
    mountpoint -q "$root$repo" || { mount --bind "$repo" "$root$repo" && mount -o remount,bind,ro "$root$repo"; }
    mountpoint -q "$root$work" || mount --bind "$work" "$root$work"
    if [ -n "$images" ] && [ -d "$images" ]; then
      mkdir -p "$root$images"
      mountpoint -q "$root$images" || { mount --bind "$images" "$root$images" && mount -o remount,bind,ro "$root$images"; }
    fi
    cat >"$dir/qemu-system-x86_64" <<WRAPPER
#!/bin/sh
exec chroot "$root" qemu-system-x86_64 "\$@"
WRAPPER
    chmod +x "$dir/qemu-system-x86_64"
    echo "$dir/qemu-system-x86_64"
    ;;
  teardown)
    unmount_all
    ;;
  *)
    say "usage: qemu-chroot.sh setup|teardown DIR WORK"
    exit 2
    ;;
esac
