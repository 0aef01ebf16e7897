/**
 * A restore by name from the store, beside the running guest, interrupted at each of its phases
 * by each fault. Afterwards: a restore that completed runs and passes the workload's check; one
 * that did not leaves no QEMU (none waiting in `inmigrate` for a state that never comes), no
 * overlay and no run directory once the next commands ran; the original guest runs on, checked.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect } from 'vitest';
import type { OperationEvent } from '../../src/index.js';
import { QmpClient } from '../../src/qmp/index.js';
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
    let output =
      ran.output ?? (ran.restored ? await checkRestored(ran.restored, ran.killed) : 'nothing restored');
    let next = await world.nextCommands(undefined);
    // A qsnap killed once the VM ran leaves a restored VM the recovery adopted: a user's now,
    // checked like any restored VM, then stopped here.
    if (/adopted/.test(next) || restoredQemus().length) {
      if (/adopted/.test(next))
        output = `adopted by the next command: ${await checkAdopted(restoredQemus())}`;
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
    /** What was restored, when the run says it itself. */
    output?: string;
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
    let struck = false;
    op.on((e: OperationEvent) => {
      // Once, at the phase's first entry (a phase such as removing is entered once per file).
      if (e.type !== 'phase' || e.phase !== cell.phase || struck) return;
      struck = true;
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
      return {
        result: `completed with its overlay on a 16 MB/s disk in ${r.restoreMs.toFixed(0)} ms`,
        output: await checkRestored([r]),
      };
    } finally {
      slow.undo();
    }
  }

  /**
   * Restored QEMUs nobody here started (a killed qsnap's, adopted): each passes the workload's
   * check. One QEMU paused because its overlay's file system was full (werror=enospc: stop) is
   * resumed first, as its user would once there is room again.
   */
  async function checkAdopted(pids: number[]): Promise<string> {
    const notes: string[] = [];
    for (const pid of pids) {
      const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      const serial = argv.map((a) => /path=([^,]*serial\.sock)/.exec(a)?.[1]).find(Boolean);
      const qmpPath = argv.map((a) => /^unix:([^,]*qmp\.sock)/.exec(a)?.[1]).find(Boolean);
      expect(serial && qmpPath, `the serial and QMP sockets of QEMU ${pid}`).toBeTruthy();
      const qmp = await QmpClient.connect(qmpPath!);
      try {
        const { status } = await qmp.execute('query-status');
        if (status === 'io-error') {
          await qmp.execute('cont');
          notes.push('paused by QEMU on the full disk, resumed');
        } else expect(status, 'the adopted VM runs').toBe('running');
      } finally {
        await qmp.close();
      }
      const console_ = await connectConsole(serial!);
      await expectCheckOk(console_, 'the adopted VM').finally(() => console_.close());
    }
    return [`${pids.length} running`, ...notes, 'check ok'].join(', ');
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
