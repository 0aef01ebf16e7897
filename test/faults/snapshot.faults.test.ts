/**
 * A store snapshot of the busy test guest, interrupted at each of its phases by each fault
 * (matrix.ts, inject.ts). After every cell the next qsnap commands run as a user would (`status`
 * recovers the VM, `gc` the store), and then: the guest runs and passes the workload's check
 * (or, if QEMU was killed, nothing of it is left), no drain guard, stream directory or intent
 * record is left, the catalog matches the files, the snapshot is either in the store and
 * verifies or not there at all, and a failure carried a code and named its phase.
 */
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Operation, type OperationEvent, openSnapshot } from '../../src/index.js';
import { collect } from '../../src/store/collect.js';
import { recoverStore } from '../../src/store/recover.js';
import { storeSnapshot } from '../../src/store/snapshot.js';
import { Store } from '../../src/store/store.js';
import { ensureBuilt } from '../support/build.js';
import { runCli, spawnCli } from '../support/cli.js';
import { canRun, isRoot } from '../support/env.js';
import { bootGuest, drainGuards, expectGuestHealthy, type Guest, stopGuest } from '../support/guest.js';
import { waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { canThrottle, FAULTS, fillUp, QmpProxy, removeDir, slowDisk } from './inject.js';
import { type Cell, cellsOf, type Outcome, Results } from './matrix.js';

/** Faults that strike at a phase (the slow disk slows every phase: one run). */
const PHASE_FAULTS = FAULTS.filter((f) => f !== 'slow-disk');

const PHASES = [
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

describe.skipIf(!canRun || !isRoot)('snapshot: every phase × every fault', () => {
  let sandbox: Sandbox;
  let guest: Guest;
  let store: Store;
  let proxy: QmpProxy;
  let storeDir: string;
  const results = new Results('snapshot', PHASES);
  let seq = 0;

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('faults-snap');
    // A store of its own size, so that `fs-full` fills it and nothing else.
    storeDir = join(await sandbox.mountTmpfs('size=900m'), 'store');
    store = await Store.open({ dir: storeDir, stateDir: sandbox.state });
    guest = await boot();
  });

  afterAll(async () => {
    results.save();
    await proxy?.stop();
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  async function boot(): Promise<Guest> {
    const g = await bootGuest(sandbox);
    await proxy?.stop();
    proxy = new QmpProxy(join(sandbox.root, `proxy${seq++}.sock`), g.vm.qmpPath);
    await proxy.start();
    return g;
  }

  const env = () => ({ ...sandbox.env, QSNAP_STORE: storeDir });

  for (const cell of [...cellsOf(PHASES, PHASE_FAULTS), ...slowCells()]) {
    it(`${cell.phase} × ${cell.fault}`, async () => {
      const outcome = await runCell(cell);
      console.info(`${cell.phase} × ${cell.fault}: ${JSON.stringify(outcome)}`);
      results.record(cell, outcome);
    });
  }

  /** The slow disk is no phase's fault: one run, its outcome for every phase. */
  function slowCells(): Cell[] {
    return [{ phase: 'all', fault: 'slow-disk' }];
  }

  async function runCell(cell: Cell): Promise<Outcome> {
    const name = `c${seq++}`;
    const stopsBefore = guest.stops;
    const ran = await strike(cell, name);
    const qemuAlive = guest.vm.running;
    const next = await nextCommands(qemuAlive, cell.fault === 'qmp-closed' ? proxy.path : guest.vm.qmpPath);
    const output = await snapshotState(name);
    if (ran.error) {
      expect(ran.error.code, 'a failure has a stable code').toMatch(/^QSNAP_[A-Z_]+$/);
      expect(ran.error.details?.['phase'], 'and names its phase').toBeDefined();
    }
    await expectStoreTidy();
    let state: string;
    if (qemuAlive) {
      await expectGuestHealthy(guest);
      state = guest.stops > stopsBefore ? 'running, check ok' : 'running (never paused), check ok';
      await tidyChain();
    } else {
      state = 'QEMU gone; nothing left of it';
      await stopGuest(guest);
      guest = await boot();
    }
    return { result: ran.result, guest: state, next, output };
  }

  /** Run the snapshot with the fault struck at the cell's phase. */
  async function strike(cell: Cell, name: string): Promise<{ result: string; error?: QsnapLike }> {
    if (cell.fault === 'kill-qsnap') {
      const child = spawnCli(['snapshot', '--qmp', guest.vm.qmpPath, '--name', name, '--json'], {
        ...env(),
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
    if (cell.fault === 'slow-disk') return slowRun(name);
    const undo: (() => void)[] = [];
    let raced: Operation<unknown> | undefined;
    const qmp = cell.fault === 'qmp-closed' ? proxy.path : guest.vm.qmpPath;
    const op = storeSnapshot(store, { qmp, name });
    op.on((e: OperationEvent) => {
      if (e.type !== 'phase' || e.phase !== cell.phase) return;
      if (cell.fault === 'kill-qemu') process.kill(guest.vm.pid, 'SIGKILL');
      if (cell.fault === 'qmp-closed') proxy.cut();
      if (cell.fault === 'fs-full') undo.push(fillUp(storeDir));
      if (cell.fault === 'dir-removed') undo.push(removeDir(store.snapshotsDir));
      if (cell.fault === 'race')
        raced = storeSnapshot(store, { qmp: guest.vm.qmpPath, name: `${name}-race` });
    });
    try {
      await op.result;
      return { result: await raceNote(raced, 'completed') };
    } catch (err) {
      return { result: await raceNote(raced, `error ${(err as QsnapLike).code}`), error: err as QsnapLike };
    } finally {
      if (cell.fault === 'kill-qemu')
        await Promise.race([guest.vm.exited, new Promise((r) => setTimeout(r, 3000))]);
      for (const u of undo) u();
    }
  }

  async function raceNote(raced: Operation<unknown> | undefined, result: string): Promise<string> {
    if (!raced) return result;
    try {
      await raced.result;
      return `${result}; the racer completed too`;
    } catch (err) {
      return `${result}; the racer: ${(err as QsnapLike).code}`;
    }
  }

  async function slowRun(name: string): Promise<{ result: string }> {
    if (!canThrottle()) return { result: 'n/a: no blkio throttle here' };
    const slow = slowDisk(sandbox.root, 16 * 2 ** 20);
    try {
      const slowStore = await Store.open({ dir: join(slow.mount, 'store'), stateDir: sandbox.state });
      const r = await storeSnapshot(slowStore, { qmp: guest.vm.qmpPath, name }).result;
      await collect(slowStore, { deleting: [Object.values((await slowStore.read()).snapshots)[0]!.id] })
        .result;
      return {
        result: `completed at 16 MB/s in ${(r.totalMs / 1000).toFixed(1)} s, pause ${r.downtimeMs.toFixed(0)} ms`,
      };
    } finally {
      slow.undo();
    }
  }

  /** What a user runs next: `status` (recovers the VM), `gc` (the store). */
  async function nextCommands(qemuAlive: boolean, qmp: string): Promise<string> {
    const said: string[] = [];
    // This process's next store call clears what a failed in-process operation could not
    // (its record, when the catalog could not be written: a full file system).
    if ((await recoverStore(store)).length) said.push('the store recovered');
    if (qemuAlive) {
      const status = await runCli(['status', '--qmp', qmp], env());
      expect(status.code, status.stderr).toBe(0);
      if (/^recovered/m.test(status.stdout)) said.push('status recovered the VM');
    }
    const gc = await runCli(['gc'], env());
    expect(gc.code, gc.stderr).toBe(0);
    if (/^recovered: /m.test(gc.stdout)) said.push('the store recovered');
    return said.join(', ');
  }

  /** The cell's snapshot: catalogued and verifying, or absent with no file that looks like one. */
  async function snapshotState(name: string): Promise<string> {
    const entry = Object.values((await store.read()).snapshots).find((s) => s.name === name);
    if (!entry) {
      const files = readdirSync(store.snapshotsDir).filter((f) => f.endsWith('.qsnap'));
      for (const f of files) {
        const catalogued = Object.values((await store.read()).snapshots).some((s) => s.file === f);
        expect(catalogued, `${f} is in the store without a catalog entry`).toBe(true);
      }
      return 'no snapshot';
    }
    const reader = await openSnapshot(store.snapshotPath(entry));
    try {
      await reader.verify();
    } finally {
      await reader.close();
    }
    return 'snapshot valid';
  }

  async function expectStoreTidy(): Promise<void> {
    // A drain guard lives until QEMU closes the stream, right after the migration ends.
    await waitUntil(() => drainGuards(sandbox).length === 0, 10_000, 'drain guards to exit').catch(
      () => undefined,
    );
    expect(drainGuards(sandbox), 'drain guards').toEqual([]);
    expect(
      readdirSync(sandbox.tmp).filter((f) => f.startsWith('qsnap-stream-')),
      'stream dirs',
    ).toEqual([]);
    const intents = join(sandbox.state, 'intents');
    expect(existsSync(intents) ? readdirSync(intents) : [], 'intent records').toEqual([]);
    const c = await store.read();
    expect(c.operations, 'operations in flight').toEqual([]);
    for (const l of Object.values(c.layers)) expect(existsSync(l.path), l.path).toBe(true);
  }

  /** Delete what the cell left in the store, so the guest's chain stays short for the next one. */
  async function tidyChain(): Promise<void> {
    const ids = Object.values((await store.read()).snapshots).map((s) => s.id);
    if (ids.length) await collect(store, { deleting: ids }).result;
  }
});

interface QsnapLike {
  code: string;
  details?: Record<string, unknown>;
}
