#!/usr/bin/env bash
# Manual smoke test of the test guest: boots images/build/ under TCG with an 80 MiB qcow2
# disk, waits for the workload, and expects `check` to pass a few times while it runs.
# Prints the seconds from QEMU's start to the workload's first line. Build the guest first
# (scripts/build-image.sh). Usage: scripts/guest-smoke.sh [checks (default 3)]
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$root/images/build
checks=${1:-3}

die() {
  echo "guest-smoke: error: $*" >&2
  exit 1
}
[ -f "$build/vmlinuz" ] && [ -f "$build/initrd.img" ] || die "no guest image; run scripts/build-image.sh"
command -v qemu-system-x86_64 >/dev/null || die "no QEMU; run: apt-get install -y qemu-system-x86 qemu-utils"

tmp=$(mktemp -d /tmp/qsnap-smoke.XXXXXX)
qemu_pid=
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill "$qemu_pid" && wait "$qemu_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

qemu-img create -q -f qcow2 "$tmp/disk.qcow2" 80M
start_ms=$(date +%s%3N)
# /dev/kvm here is a PVM hypervisor that hangs guests: always TCG.
qemu-system-x86_64 -accel tcg -m 256 -nographic -monitor none \
  -kernel "$build/vmlinuz" -initrd "$build/initrd.img" \
  -append 'console=ttyS0 quiet qsnap.mem=64' \
  -drive "file=$tmp/disk.qcow2,if=virtio,format=qcow2" \
  -chardev "socket,id=serial0,path=$tmp/serial.sock,server=on,wait=off,logfile=$tmp/serial.log" \
  -serial chardev:serial0 </dev/null >"$tmp/qemu.out" 2>&1 &
qemu_pid=$!

# The console client: plain Node (no build step), one line per event on stdout.
node --input-type=module - "$tmp/serial.sock" "$start_ms" "$checks" <<'EOF' || die "failed; console log: $(tail -c 2000 "$tmp/serial.log" 2>/dev/null)"
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

const [sock, startMs, checks] = process.argv.slice(2);
const lines = [];
let waiter;
const wait = (re, ms) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timeout waiting for ${re}`)), ms);
    waiter = (line) => re.test(line) && (clearTimeout(timer), (waiter = undefined), resolve(line), true);
    while (lines.length) if (waiter?.(lines.shift())) return;
  });

let conn;
for (let i = 0; !conn; i++) {
  try {
    conn = await new Promise((res, rej) => net.createConnection(sock).once('connect', function () { res(this); }).once('error', rej));
  } catch (err) {
    if (i > 100) throw err;
    await sleep(100);
  }
}
let buf = '';
conn.on('data', (d) => {
  buf += d.toString('latin1');
  const parts = buf.split(/\r?\n|\r/);
  buf = parts.pop();
  for (const raw of parts) {
    const at = raw.indexOf('QSNAP-');
    if (at < 0) continue;
    const line = raw.slice(at);
    if (!waiter?.(line)) lines.push(line);
  }
});

const ready = await wait(/^QSNAP-(WORKLOAD READY|HB) /, 120_000);
console.log(`boot-to-ready: ${((Date.now() - Number(startMs)) / 1000).toFixed(2)} s`);
console.log(ready);
console.log(await wait(/^QSNAP-HB /, 5_000));
for (let i = 1; i <= Number(checks); i++) {
  conn.write(`check smoke${i}\n`);
  const reply = await wait(new RegExp(`^QSNAP-(CHECK|ERROR) .*token=smoke${i}( |$)`), 60_000);
  console.log(reply);
  if (!reply.startsWith('QSNAP-CHECK OK ')) process.exit(1);
  console.log(await wait(/^QSNAP-HB /, 5_000));
}
conn.end();
EOF
echo "guest-smoke: OK"
