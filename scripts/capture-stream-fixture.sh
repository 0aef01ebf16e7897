#!/usr/bin/env bash
# Capture a QEMU migration stream of a tiny VM that boots nothing (SeaBIOS only), for the
# fixtures in test/fixtures/stream/. Usage:
#
#   scripts/capture-stream-fixture.sh background|precopy OUT.bin[.gz]
#
# background: migrate-set-capabilities background-snapshot=true, then migrate (the stream a
#             live snapshot produces: no RAM END, device tail written verbatim after the RAM).
# precopy:    plain migrate (RAM START, PART…, RAM END, FULL device sections, EOF, VMDESCRIPTION).
#
# The VM starts paused (-S), runs SeaBIOS for a second so RAM holds something, then migrates
# to "exec:cat > OUT". QMP is spoken by a few lines of node (no socat on the build machines).
# An OUT ending in .gz is gzip -9'd. MAX_BANDWIDTH (bytes/s, default 10 GiB/s) throttles the
# migration: a low value makes QEMU split the RAM into many PART sections. MEM (MiB, default 32)
# sizes the guest: QEMU also ends a PART section after 50 ms of work (ram.c, ram_save_iterate).
set -euo pipefail

mode=${1:?usage: $0 background|precopy OUT.bin[.gz]}
out=${2:?usage: $0 background|precopy OUT.bin[.gz]}
case $mode in background | precopy) ;; *) echo "unknown mode: $mode" >&2; exit 2 ;; esac

work=$(mktemp -d)
qemu_pid=
cleanup() {
  if [[ -n $qemu_pid ]]; then kill "$qemu_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

qemu-system-x86_64 -accel tcg -m "${MEM:-32}" -nodefaults -display none -S \
  -qmp "unix:$work/qmp.sock,server=on,wait=off" -pidfile "$work/qemu.pid" -daemonize
qemu_pid=$(cat "$work/qemu.pid")

MAX_BANDWIDTH=${MAX_BANDWIDTH:-10737418240} MODE=$mode SOCK=$work/qmp.sock RAW=$work/stream.bin node --input-type=module -e '
import net from "node:net";
const sock = net.createConnection(process.env.SOCK);
sock.on("error", () => {}); // quit closes the socket under us
let buf = "";
const waiting = [];
sock.on("data", (d) => {
  buf += d;
  let nl;
  while ((nl = buf.indexOf("\n")) >= 0) {
    const msg = JSON.parse(buf.slice(0, nl));
    buf = buf.slice(nl + 1);
    if ("return" in msg || "error" in msg || "QMP" in msg) waiting.shift()?.(msg);
  }
});
const next = () => new Promise((r) => waiting.push(r));
const cmd = async (execute, args) => {
  const p = next();
  sock.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + "\n");
  const r = await p;
  if (r.error) throw new Error(execute + ": " + JSON.stringify(r.error));
  return r.return;
};
await next(); // greeting
await cmd("qmp_capabilities");
await cmd("cont");
await new Promise((r) => setTimeout(r, 1000));
if (process.env.MODE === "background") {
  await cmd("migrate-set-capabilities", { capabilities: [{ capability: "background-snapshot", state: true }] });
}
await cmd("migrate-set-parameters", { "max-bandwidth": Number(process.env.MAX_BANDWIDTH) });
await cmd("migrate", { uri: "exec:cat > " + process.env.RAW });
for (;;) {
  const s = await cmd("query-migrate");
  if (s.status === "completed") break;
  if (s.status === "failed" || s.status === "cancelled") throw new Error("migration " + s.status + ": " + (s["error-desc"] ?? ""));
  await new Promise((r) => setTimeout(r, 50));
}
console.error("status:", JSON.stringify(await cmd("query-status")));
await cmd("quit").catch(() => {});
sock.end();
'

if [[ $out == *.gz ]]; then gzip -9 -n -c "$work/stream.bin" >"$out"; else cp "$work/stream.bin" "$out"; fi
qemu-system-x86_64 --version | head -1 >&2
ls -l "$out" >&2
