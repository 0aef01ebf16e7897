/**
 * A restore by name from the store, beside the running guest, interrupted at each of its phases
 * by each fault. Afterwards: a restore that completed runs and passes the workload's check; one
 * that did not leaves no QEMU (none waiting in `inmigrate` for a state that never comes), no
 * overlay and no run directory once the next commands ran; the original guest runs on, checked.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect } from 'vitest';
import type { OperationEvent } from '../../src/index.js';
import { type StoreRestoreResult, storeRestore } from '../../src/store/restore.js';
import { storeSnapshot } from '../../src/store/snapshot.js';
import { ensureBuilt } from '../support/build.js';
import { spawnCli } from '../support/cli.js';
import { canRun, isRoot } from '../support/env.js';
import { connectConsole, expectCheckOk } from '../support/guest.js';
import { isAlive, killPid, pgrep, waitGone } from '../support/process.js';
import { canThrottle, FAULTS, fillUp, removeDir, slowDisk } from './inject.js';
import { type Cell, defineCells, type Outcome, Results } from './matrix.js';
import { FaultWorld } from './world.js';

export const RESTORE_PHASES = [
  'open',
  'disks',
  'overlays',
  'launch',
  'launched',
  'load',
  'checked',
  'running',
  'index',
];
/** `make test`'s cells of this group: ones that once found a bug. */
const SAMPLE = ['launch × kill-qsnap', 'index × fs-full'] as const;
const PHASE_FAULTS = FAULTS.filter((f) => f !== 'slow-disk');

describe.skipIf(!canRun || !isRoot)('restore: every phase × every fault', () => {
  let world: FaultWorld;
  let overlayDir: string;
  /** QEMUs restores of this file started: their run directories are under this sandbox's TMPDIR. */
  const restoredQemus = () => pgrep(`qemu-system.*${world.sandbox.tmp}/qsnap-vm-`);
  const results = new Results('restore', RESTORE_PHASES);

  beforeAll(async () => {
    ensureBuilt();
    world = await FaultWorld.open('faults-rest');
    overlayDir = join(world.storeDir, '..', 'overlays');
    await storeSnapshot(world.store, { qmp: world.guest.vm.qmpPath, name: 'base' }).result;
  });

  afterAll(async () => {
    results.save();
    for (const pid of restoredQemus()) await killPid(pid);
    await world?.close();
  });

  afterEach(() => world?.scrub(), 180_000);

  defineCells(results, RESTORE_PHASES, PHASE_FAULTS, SAMPLE, runCell);

  async function runCell(cell: Cell): Promise<Outcome> {
    const stopsBefore = world.guest.stops;
    if (cell.fault === 'qmp-closed') return na('restore talks to the QEMU it starts over a private socket');
    const ran = cell.fault === 'slow-disk' ? await slowRun() : await strike(cell);
    const output = ran.restored ? await checkRestored(ran.restored, ran.killed) : 'nothing restored';
    let next = await world.nextCommands(undefined);
    // A qsnap killed once the VM ran leaves a restored VM the recovery adopted: a user's now, stopped here.
    if (/adopted/.test(next) || restoredQemus().length) {
      for (const pid of restoredQemus()) await killPid(pid);
      next = [next, await world.nextCommands(undefined)].filter(Boolean).join(', ');
    }
    expect(restoredQemus(), 'no restored QEMU left behind').toEqual([]);
    expect(
      readdirSync(world.sandbox.tmp).filter((f) => f.startsWith('qsnap-vm-')),
      'run directories',
    ).toEqual([]);
    if (ran.error) expect(ran.error.details?.['phase'], 'the failure names its phase').toBeDefined();
    await world.expectTidy();
    const guest = await world.guestAfter(stopsBefore);
    return { result: ran.result, guest, next, output };
  }

  function na(why: string): Outcome {
    return { result: `n/a: ${why}`, guest: '', next: '', output: '' };
  }

  interface Ran {
    result: string;
    restored?: StoreRestoreResult[];
    /** QEMUs the fault killed (their exit may still be under way on a loaded host). */
    killed?: number[];
    error?: { code: string; details?: Record<string, unknown> };
  }

  async function strike(cell: Cell): Promise<Ran> {
    if (cell.fault === 'kill-qsnap') {
      const child = spawnCli(['restore', 'base', '--json', '--overlay-dir', overlayDir], {
        ...world.env(),
        QSNAP_FAULT: `kill-at:${cell.phase}`,
      });
      const r = await child.done;
      if (r.signal === 'SIGKILL') return { result: 'killed' };
      await killPid(r.json?.['pid'] as number);
      return { result: `exit ${r.code} (phase not reached)` };
    }
    const before = new Set(restoredQemus());
    const undo: (() => void)[] = [];
    const killed: number[] = [];
    let racer: Promise<StoreRestoreResult> | undefined;
    const op = storeRestore(world.store, { name: 'base', overlayDir });
    op.on((e: OperationEvent) => {
      if (e.type !== 'phase' || e.phase !== cell.phase) return;
      if (cell.fault === 'kill-qemu')
        for (const pid of restoredQemus()) {
          if (before.has(pid)) continue;
          process.kill(pid, 'SIGKILL');
          killed.push(pid);
        }
      if (cell.fault === 'fs-full') undo.push(fillUp(overlayDir));
      if (cell.fault === 'dir-removed') undo.push(removeDir(overlayDir));
      if (cell.fault === 'race') racer = storeRestore(world.store, { name: 'base', overlayDir }).result;
    });
    const settle = async (
      result: string,
      restored: StoreRestoreResult[],
      error?: Ran['error'],
    ): Promise<Ran> => {
      for (const pid of killed) expect(await waitGone(pid, 30_000), `QEMU ${pid} exits`).toBe(true);
      for (const u of undo) u();
      const raced = racer
        ? await racer.then(
            (r) => ({ r }),
            (err: { code: string }) => ({ code: err.code }),
          )
        : undefined;
      if (raced && 'r' in raced) restored.push(raced.r);
      const note = raced
        ? 'r' in raced
          ? '; the racer restored too'
          : `; the racer: ${raced.code}`
        : cell.fault === 'kill-qemu' && killed.length === 0
          ? ' (no QEMU started yet at this phase)'
          : '';
      return { result: `${result}${note}`, restored, killed, ...(error ? { error } : {}) };
    };
    try {
      return await settle('completed', [await op.result]);
    } catch (err) {
      const error = err as { code: string; details?: Record<string, unknown> };
      return settle(`error ${error.code}`, [], error);
    }
  }

  async function slowRun(): Promise<Ran> {
    if (!canThrottle()) return { result: 'n/a: no blkio throttle here' };
    const slow = slowDisk(world.sandbox.root, 16 * 2 ** 20);
    try {
      const r = await storeRestore(world.store, { name: 'base', overlayDir: slow.mount }).result;
      const output = await checkRestored([r]);
      return {
        result: `completed with its overlay on a 16 MB/s disk in ${r.restoreMs.toFixed(0)} ms; ${output}`,
      };
    } finally {
      slow.undo();
    }
  }

  /** Each restored VM runs and passes the workload's check; then it is stopped (gc tidies after it). */
  async function checkRestored(restored: StoreRestoreResult[], killed: number[] = []): Promise<string> {
    const dead = restored.filter((r) => killed.includes(r.pid) || !isAlive(r.pid));
    if (dead.length) return `${restored.length} restored; ${dead.length} killed right after`;
    for (const r of restored) {
      const serial = Object.entries(r.relocated).find(([from]) => from.endsWith('serial.sock'))![1];
      const console_ = await connectConsole(serial);
      await expectCheckOk(console_, 'the restored VM').finally(() => console_.close());
      await killPid(r.pid);
    }
    return `${restored.length} restored, check ok`;
  }
});
