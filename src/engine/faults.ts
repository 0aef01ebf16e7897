/**
 * Fault injection for qsnap's own tests: `QSNAP_FAULT=<point>[,<point>…]` makes the engine
 * misbehave at a named point, so tests can prove every failure path leaves the guest running
 * and its disks intact. Points: `after-stop` (hang right after pausing the guest, to be
 * killed), `bad-migration-socket` (QEMU connects to a socket nobody listens on),
 * `stream-error` (the receiver fails mid-stream), `stream-hang` (hang mid-stream, after the
 * guest was resumed and 20 MiB were received, to be killed), `fail-after-migrate` (fail as
 * soon as `migrate` returns, before QEMU's connection is accepted).
 */
const HANGING = new Set(['after-stop', 'stream-hang']);

/** The fault points QSNAP_FAULT names now (read once where a hot path checks them). */
export function activeFaults(): ReadonlySet<string> {
  const spec = process.env['QSNAP_FAULT'];
  return new Set(spec ? spec.split(',') : []);
}

export function faultPoint(name: string, active: ReadonlySet<string> = activeFaults()): boolean {
  if (!active.has(name)) return false;
  if (HANGING.has(name)) {
    // Block the event loop: nothing may run from here on (as if qsnap had been SIGKILLed here).
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 600_000);
  }
  return true;
}
