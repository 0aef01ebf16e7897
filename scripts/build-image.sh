#!/usr/bin/env bash
# Builds qsnap's test guest into images/build/: vmlinuz (Debian's cloud kernel),
# initrd.img (gzip'd newc cpio: busybox-static, images/init, the virtio modules and the
# static workload from images/workload/) and image.json (versions, build time, sha256s).
#
# Idempotent: when image.json records the same inputs (package versions and the hashes of
# the sources and of this script) and the files still match their sha256, it does nothing.
# Packages are fetched with `apt-get download` into images/build/cache/ and unpacked with
# `dpkg -x`; nothing is installed except the build tools, and those only when run as root.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=$root/images/build
cache=$out/cache
kernel_meta=linux-image-cloud-amd64
module_targets="virtio_pci virtio_blk"
# Loaded only with qsnap.extra=1 (the compatibility tests' SCSI and IDE disks): probing them
# would lengthen every other boot.
extra_targets="virtio_scsi sd_mod ata_piix"

say() { echo "build-image: $*"; }
die() {
  echo "build-image: error: $*" >&2
  exit 1
}

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
  die "needs a Debian system (apt-get, dpkg-deb)"

# ---- packages on the build host ------------------------------------------------------

apt_updated=
apt_update() {
  [ -n "$apt_updated" ] && return 1
  [ "$(id -u)" = 0 ] || die "apt's package lists lack $1; run: apt-get update"
  say "apt-get update"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  apt_updated=1
}

# require <package> <test command...>: install the package when the test fails.
require() {
  local pkg=$1
  shift
  "$@" >/dev/null 2>&1 && return
  [ "$(id -u)" = 0 ] || die "missing $pkg; run: apt-get install -y $pkg"
  say "apt-get install $pkg"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1; then
    apt_update "$pkg" || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null || die "cannot install $pkg"
  fi
  "$@" >/dev/null 2>&1 || die "$pkg is installed but '$*' still fails"
}

has_static_libc() { [ -f "$(gcc -print-file-name=libc.a)" ]; }

require gcc command -v gcc
require libc6-dev has_static_libc
require gzip command -v gzip
require coreutils command -v sha256sum

# ---- what to build from --------------------------------------------------------------

# The kernel package the metapackage points at today (Debian replaces old ones), and the
# candidate versions. One apt-cache call: without a pkgcache.bin (Docker-style apt config)
# each call parses every package list again.
resolve() {
  local info
  info=$(apt-cache show --no-all-versions "$kernel_meta" busybox-static 2>/dev/null) || true
  read -r kpkg kver < <(awk -v meta="$kernel_meta" '
    $1 == "Package:" { pkg = $2 }
    pkg == meta && $1 == "Depends:" {
      for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-[0-9]/) {
        name = $i; sub(/,$/, "", name); ver = ""
        if ($(i + 1) == "(=") { ver = $(i + 2); sub(/\),?$/, "", ver) }
        print name, ver; exit
      }
    }' <<<"$info") || true
  bver=$(awk '$1 == "Package:" { pkg = $2 } pkg == "busybox-static" && $1 == "Version:" { print $2; exit }' <<<"$info")
  if [ -n "${kpkg:-}" ] && [ -z "${kver:-}" ]; then # not pinned by the metapackage: its candidate
    kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2; exit }')
  fi
  [ -n "${kpkg:-}" ] && [ -n "${kver:-}" ] && [ -n "$bver" ]
}
resolve || { apt_update "$kernel_meta or busybox-static" && resolve; } ||
  die "cannot find $kernel_meta and busybox-static in apt (is this Debian 12 amd64?)"

sources=("$root/images/init" "$root/scripts/build-image.sh" "$root"/images/workload/*.[ch])
hash_inputs() {
  inputs=$({
    echo "$kpkg=$kver busybox-static=$bver"
    sha256sum "${sources[@]}" | sed "s| $root/| |"
  } | sha256sum | cut -c1-64)
}
hash_inputs

up_to_date() {
  local json=$out/image.json f sum
  [ -f "$json" ] && grep -q "\"inputs\": \"$inputs\"" "$json" || return 1
  for f in vmlinuz initrd.img; do
    [ -f "$out/$f" ] || return 1
    sum=$(sha256sum "$out/$f" | cut -c1-64)
    grep -q "\"sha256\": \"$sum\"" "$json" || return 1
  done
}
if up_to_date; then
  say "up to date: $kpkg $kver, busybox-static $bver (images/build)"
  exit 0
fi

# ---- downloads -----------------------------------------------------------------------

mkdir -p "$cache"
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# The cached .deb of package=version, or nothing.
cached_deb() {
  local f
  for f in "$cache/$1"_*.deb; do
    [ -f "$f" ] && [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$2" ] && echo "$f" && return
  done
  return 0
}

# fetch <package> <version>: sets deb to the cached .deb, downloading it if needed.
# Returns 1 when the download failed and apt-get update moved the versions: resolve again.
fetch() {
  local pkg=$1 ver=$2 dl=$stage/dl
  deb=$(cached_deb "$pkg" "$ver")
  [ -n "$deb" ] && return 0
  say "downloading $pkg $ver"
  rm -rf "$dl" && mkdir -p "$dl"
  # apt's sandbox user (_apt) may not write here; download as ourselves.
  if ! (cd "$dl" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" "$pkg=$ver" >/dev/null 2>&1); then
    apt_update "$pkg=$ver" || die "apt-get download $pkg=$ver failed"
    resolve || die "$kernel_meta or busybox-static vanished after apt-get update"
    return 1
  fi
  mv "$dl"/*.deb "$cache/"
  deb=$(cached_deb "$pkg" "$ver")
  [ -n "$deb" ] || die "downloaded $pkg but no .deb of version $ver appeared"
}

fetch_all() { fetch "$kpkg" "$kver" && kdeb=$deb && fetch busybox-static "$bver" && bdeb=$deb; }
fetch_all || fetch_all || die "cannot download $kpkg $kver and busybox-static $bver"
hash_inputs

# ---- kernel and modules --------------------------------------------------------------

say "unpacking $(basename "$kdeb") and $(basename "$bdeb")"
dpkg -x "$kdeb" "$stage/kernel"
dpkg -x "$bdeb" "$stage/busybox"
release=$(ls "$stage/kernel/lib/modules" | awk 'NR == 1')
moddir=$stage/kernel/lib/modules/$release
vmlinuz=$stage/kernel/boot/vmlinuz-$release
[ -f "$vmlinuz" ] || die "$kpkg has no boot/vmlinuz-$release"
busybox=$stage/busybox/bin/busybox
[ -x "$busybox" ] || die "busybox-static has no bin/busybox"

rootfs=$stage/rootfs
mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp,lib/modules}

# Module file names use either - or _; modules.builtin lists the ones compiled in.
module_file() {
  local n
  for n in "$1" "${1//_/-}"; do
    find "$moddir/kernel" \( -name "$n.ko" -o -name "$n.ko.xz" -o -name "$n.ko.zst" -o -name "$n.ko.gz" \) -print -quit
  done | awk 'NR == 1'
}
is_builtin() { grep -qE "/($1|${1//_/-})\.ko\$" "$moddir/modules.builtin" 2>/dev/null; }

# Unpack one module into the initrd as plain .ko (busybox insmod wants it so).
add_module() {
  local src=$1 dst=$rootfs/lib/modules/$2.ko
  case "$src" in
    *.ko) cp "$src" "$dst" ;;
    *.xz) require xz-utils command -v xz && xz -dc "$src" >"$dst" ;;
    *.zst) require zstd command -v zstd && zstd -qdc "$src" >"$dst" ;;
    *.gz) gzip -dc "$src" >"$dst" ;;
  esac
}

# Depth-first over each module's `depends=` (its .modinfo): dependencies load first.
visited=" " order=""
visit() {
  local m=$1 f d
  case "$visited" in *" $m "*) return ;; esac
  visited="$visited$m "
  if is_builtin "$m"; then
    say "module $m is built in"
    return
  fi
  f=$(module_file "$m")
  [ -n "$f" ] || die "$release has no module $m"
  add_module "$f" "$m"
  for d in $(grep -aoE 'depends=[A-Za-z0-9_,-]*' "$rootfs/lib/modules/$m.ko" | awk -F= 'NR == 1 { print $2 }' | tr , ' '); do
    visit "${d//-/_}"
  done
  order="$order $m"
}
for m in $module_targets; do visit "$m"; done
order=${order# }
echo "$order" >"$rootfs/lib/modules/order"
base=$order order=""
for m in $extra_targets; do visit "$m"; done
extra=${order# } order=$base
echo "$extra" >"$rootfs/lib/modules/extra"
say "kernel $release, modules: $order; with qsnap.extra=1: $extra"

# ---- workload and initrd -------------------------------------------------------------

say "compiling workload"
gcc -static -O2 -pthread -Wall -Wextra -s -o "$rootfs/bin/qsnap-workload" "$root/images/workload/workload.c" ||
  die "cannot compile images/workload/workload.c"
cp "$busybox" "$rootfs/bin/busybox"
install -m 0755 "$root/images/init" "$rootfs/init"

say "packing initrd"
# busybox's own cpio applet writes newc, so the build needs no cpio package.
(cd "$rootfs" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9 -n >"$stage/initrd.img"
[ -s "$stage/initrd.img" ] || die "packing the initrd failed"
cp "$vmlinuz" "$stage/vmlinuz"

# ---- results -------------------------------------------------------------------------

sha() { sha256sum "$1" | cut -c1-64; }
bytes() { stat -c %s "$1"; }
bb_version=$("$busybox" 2>&1 | awk 'NR == 1 { print $2 }')
mv -f "$stage/vmlinuz" "$out/vmlinuz"
mv -f "$stage/initrd.img" "$out/initrd.img"
json_modules=$(printf '"%s", ' $order)
json_extra=$(printf '"%s", ' $extra)
cat >"$stage/image.json" <<EOF
{
  "kernel": { "release": "$release", "package": "$kpkg", "version": "$kver" },
  "busybox": { "version": "${bb_version#v}", "package": "busybox-static", "packageVersion": "$bver" },
  "modules": [${json_modules%, }],
  "extraModules": [${json_extra%, }],
  "builtAt": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "inputs": "$inputs",
  "files": {
    "vmlinuz": { "sha256": "$(sha "$out/vmlinuz")", "bytes": $(bytes "$out/vmlinuz") },
    "initrd.img": { "sha256": "$(sha "$out/initrd.img")", "bytes": $(bytes "$out/initrd.img") }
  }
}
EOF
mv -f "$stage/image.json" "$out/image.json"

# Keep only the debs this image was built from.
for f in "$cache"/*.deb; do
  [ "$f" = "$kdeb" ] || [ "$f" = "$bdeb" ] || rm -f "$f"
done
say "done: images/build/vmlinuz ($release), images/build/initrd.img ($(($(bytes "$out/initrd.img") / 1024)) KiB)"
