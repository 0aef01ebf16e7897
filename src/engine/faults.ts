/**
 * Fault injection for qsnap's own tests: named points where the snapshot sequence misbehaves
 * on purpose, so tests can prove every failure path leaves the guest running and its disks
 * intact. Faults are explicit: an operation runs them only when its options carry them
 * (`faults`); the CLI takes them from `QSNAP_FAULT=<point>[,<point>…]` once at start-up, so a
 * test can inject them into a qsnap child process. Nothing on the way reads the environment.
 *
 * - `after-stop`: hang right after pausing the guest (to be killed: as if qsnap died there)
 * - `in-switchover`: live-precopy: hang in QEMU's switchover pause, the disks frozen, before
 *   `migrate-continue` (to be killed: the guest stays paused in `pre-switchover`)
 * - `switchover-error`: live-precopy: fail in QEMU's switchover pause, the disks frozen
 * - `live-precopy-on-tcg`: use live-precopy even where QEMU's dirty tracking loses writes (TCG
 *   before 9.0, preflight.ts): for recovery tests on 7.2 and as a negative control
 * - `precopy-freeze-early`: a pre-copy strategy freezes the disks while the guest runs, a second
 *   or more before the RAM instant (live-precopy: when the migration starts; stopped-precopy: a
 *   second before the pause): a negative control, the disk older than RAM
 * - `bad-migration-socket`: QEMU connects to a socket nobody listens on
 * - `fail-after-migrate`: fail as soon as `migrate` returns, before QEMU's connection is accepted
 * - `stream-error`: the receiver fails after 20 MiB of the stream
 * - `stream-hang`: hang after 20 MiB of the stream, the guest resumed (to be killed)
 * - `kill-at:<phase>` (CLI only, src/cli/run.ts): SIGKILL qsnap the moment an operation enters `<phase>`
 * - `slow-merge`: store merges stream at 4 MiB/s (QEMU's job speed limit), to be killed mid-merge
 * - `hang-after-removal`: a delete or gc hangs after removing its first file (to be killed)
 */
export const FAULT_POINTS = [
  'after-stop',
  'in-switchover',
  'switchover-error',
  'live-precopy-on-tcg',
  'precopy-freeze-early',
  'bad-migration-socket',
  'fail-after-migrate',
  'stream-error',
  'stream-hang',
  'slow-merge',
  'hang-after-removal',
] as const;

export type FaultPoint = (typeof FAULT_POINTS)[number];
export type Faults = ReadonlySet<FaultPoint>;

export const NO_FAULTS: Faults = new Set();

/** How far into the stream the stream faults strike. */
export const STREAM_FAULT_AFTER_BYTES = 20 * 2 ** 20;

/** A `QSNAP_FAULT` value as fault points; unknown names are an error, so a test cannot pass by a typo. */
export function parseFaults(spec: string | undefined): Faults {
  const names = (spec ?? '').split(',').filter((n) => n !== '');
  const unknown = names.filter((n) => !(FAULT_POINTS as readonly string[]).includes(n));
  if (unknown.length)
    throw new Error(`unknown fault point(s) ${unknown.join(', ')}; known: ${FAULT_POINTS.join(', ')}`);
  return new Set(names as FaultPoint[]);
}

/**
 * Block the event loop for good (ten minutes): from here nothing of this process runs any
 * more, as if it had been SIGKILLed at this point, until the test kills it.
 */
export function hangForever(): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 600_000);
}
