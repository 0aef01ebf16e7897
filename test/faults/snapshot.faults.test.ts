/**
 * A store snapshot of the busy test guest, interrupted at each of its phases by each fault
 * (matrix.ts, inject.ts). After every cell the next qsnap commands run as a user would, and then:
 * the guest runs and passes the workload's check (or, if QEMU was killed, nothing of it is
 * left), nothing of qsnap is left over (world.ts), the snapshot is either in the store and
 * verifies or not there at all, and a failure carried a code and named its phase.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect } from 'vitest';
import { type Operation, type OperationEvent, openSnapshot } from '../../src/index.js';
import { collect } from '../../src/store/collect.js';
import { storeSnapshot } from '../../src/store/snapshot.js';
import { Store } from '../../src/store/store.js';
import { ensureBuilt } from '../support/build.js';
import { runCli, spawnCli } from '../support/cli.js';
import { canRun, isRoot } from '../support/env.js';
import { canThrottle, FAULTS, fillUp, removeDir, slowDisk } from './inject.js';
import { type Cell, defineCells, type Outcome, Results } from './matrix.js';
import { FaultWorld } from './world.js';

/** Faults that strike at a phase (the slow disk slows every phase: one run). */
/** `make test`'s cells of this group: ones that once found a bug. */
const SAMPLE = ['migrating × kill-qsnap', 'published × dir-removed', 'mid-stream × kill-qemu'] as const;
const PHASE_FAULTS = FAULTS.filter((f) => f !== 'slow-disk');

export const SNAPSHOT_PHASES = [
  'connect',
  'probe',
  'intent',
  'prepare',
  'prepared',
  'pause',
  'paused',
  'frozen',
  'migrating',
  'captured',
  'stream',
  'mid-stream',
  'device-tail',
  'finish',
  'published',
  'index',
];

interface Struck {
  result: string;
  error?: { code: string; details?: Record<string, unknown> };
}

describe.skipIf(!canRun || !isRoot)('snapshot: every phase × every fault', () => {
  let world: FaultWorld;
  const results = new Results('snapshot', SNAPSHOT_PHASES);

  beforeAll(async () => {
    ensureBuilt();
    world = await FaultWorld.open('faults-snap');
  });

  afterAll(async () => {
    results.save();
    await world?.close();
  });

  afterEach(() => world?.scrub(), 180_000);

  defineCells(results, SNAPSHOT_PHASES, PHASE_FAULTS, SAMPLE, runCell);

  async function runCell(cell: Cell): Promise<Outcome> {
    const name = world.name();
    const stopsBefore = world.guest.stops;
    const qmp = cell.fault === 'qmp-closed' ? world.proxy!.path : world.guest.vm.qmpPath;
    const ran = cell.fault === 'slow-disk' ? await slowRun(name) : await strike(cell, name, qmp);
    const next = await world.nextCommands(qmp);
    const output = await snapshotState(name);
    if (ran.error) {
      expect(ran.error.code, 'a failure has a stable code').toMatch(/^QSNAP_[A-Z_]+$/);
      expect(ran.error.details?.['phase'], 'and names its phase').toBeDefined();
    }
    await world.expectTidy();
    const guest = await world.guestAfter(stopsBefore);
    await deleteAll();
    return { result: ran.result, guest, next, output };
  }

  /** Run the snapshot with the fault struck at the cell's phase. */
  async function strike(cell: Cell, name: string, qmp: string): Promise<Struck> {
    if (cell.fault === 'kill-qsnap') {
      const child = spawnCli(['snapshot', '--qmp', qmp, '--name', name, '--json'], {
        ...world.env(),
        QSNAP_FAULT: `kill-at:${cell.phase}`,
      });
      const r = await child.done;
      return {
        result:
          r.signal === 'SIGKILL'
            ? 'killed'
            : r.code === 0
              ? 'completed (phase not reached)'
              : `exit ${r.code}`,
      };
    }
    const undo: (() => void)[] = [];
    let raced: Operation<unknown> | undefined;
    const op = storeSnapshot(world.store, { qmp, name });
    let struck = false;
    op.on((e: OperationEvent) => {
      // Once, at the phase's first entry (a phase such as removing is entered once per file).
      if (e.type !== 'phase' || e.phase !== cell.phase || struck) return;
      struck = true;
      if (cell.fault === 'kill-qemu') process.kill(world.guest.vm.pid, 'SIGKILL');
      if (cell.fault === 'qmp-closed') world.proxy!.cut();
      if (cell.fault === 'fs-full') undo.push(fillUp(world.storeDir));
      if (cell.fault === 'dir-removed') undo.push(removeDir(world.store.snapshotsDir));
      if (cell.fault === 'race')
        raced = storeSnapshot(world.store, { qmp: world.guest.vm.qmpPath, name: `${name}-race` });
    });
    try {
      await op.result;
      return { result: await raceNote(raced, 'completed') };
    } catch (err) {
      const error = err as Struck['error'] & {};
      return { result: await raceNote(raced, `error ${error.code}`), error };
    } finally {
      if (cell.fault === 'kill-qemu')
        await Promise.race([world.guest.vm.exited, new Promise((r) => setTimeout(r, 3000))]);
      for (const u of undo) u();
    }
  }

  async function raceNote(raced: Operation<unknown> | undefined, result: string): Promise<string> {
    if (!raced) return result;
    try {
      await raced.result;
      return `${result}; the racer completed too`;
    } catch (err) {
      return `${result}; the racer: ${(err as { code: string }).code}`;
    }
  }

  async function slowRun(name: string): Promise<Struck> {
    if (!canThrottle()) return { result: 'n/a: no blkio throttle here' };
    const slow = slowDisk(world.sandbox.root, 16 * 2 ** 20);
    try {
      const store = await Store.open({ dir: join(slow.mount, 'store'), stateDir: world.sandbox.state });
      const r = await storeSnapshot(store, { qmp: world.guest.vm.qmpPath, name }).result;
      await collect(store, { deleting: Object.keys((await store.read()).snapshots) }).result;
      return {
        result: `completed at 16 MB/s in ${(r.totalMs / 1000).toFixed(1)} s, pause ${r.downtimeMs.toFixed(0)} ms`,
      };
    } finally {
      slow.undo();
    }
  }

  /** The cell's snapshot: catalogued and verifying, or absent (expectTidy: no stray file). */
  async function snapshotState(name: string): Promise<string> {
    const entry = Object.values((await world.store.read()).snapshots).find((s) => s.name === name);
    if (!entry) return 'no snapshot';
    const file = world.store.snapshotPath(entry);
    if (!existsSync(file)) {
      // The file was published, then taken away with its directory: the catalog keeps the entry
      // (its layers may still be needed), `list` shows it missing, and deleting it still works.
      const list = await runCli(['list', '--json'], world.env());
      expect(list.code, list.stderr).toBe(0);
      const row = (
        JSON.parse(list.stdout) as { snapshots: { name: string; state: string }[] }
      ).snapshots.find((r) => r.name === name);
      expect(row?.state, 'list says the file is missing').toMatch(/^missing /);
      const removed = await runCli(['delete', name], world.env());
      expect(removed.code, removed.stderr).toBe(0);
      return 'its file gone: list shows it missing, delete removes it';
    }
    const reader = await openSnapshot(file);
    try {
      await reader.verify();
    } finally {
      await reader.close();
    }
    return 'snapshot valid';
  }

  /** Delete what the cell left in the store, so the guest's chain stays short for the next one. */
  async function deleteAll(): Promise<void> {
    const ids = Object.keys((await world.store.read()).snapshots);
    if (ids.length) await collect(world.store, { deleting: ids }).result;
  }
});
