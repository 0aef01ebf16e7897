/**
 * A delete from the store — the middle of three snapshots, its layer merged live into the next
 * one — interrupted at each phase by each fault. Afterwards, once the next commands ran: the
 * remaining snapshots read exactly the disks they read before (hashes of their flattened
 * chains), one of them restores and passes the workload's check, the running guest passes its
 * check, and the catalog matches the files. A delete is never half done for good.
 */
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect } from 'vitest';
import type { OperationEvent } from '../../src/index.js';
import { collect } from '../../src/store/collect.js';
import { storeRestore } from '../../src/store/restore.js';
import { storeSnapshot } from '../../src/store/snapshot.js';
import { Store } from '../../src/store/store.js';
import { ensureBuilt } from '../support/build.js';
import { spawnCli } from '../support/cli.js';
import { canRun, isRoot } from '../support/env.js';
import { sha256File } from '../support/files.js';
import { connectConsole, expectCheckOk } from '../support/guest.js';
import { killPid } from '../support/process.js';
import { canThrottle, FAULTS, fillUp, removeDir, slowDisk } from './inject.js';
import { type Cell, defineCells, type Outcome, Results } from './matrix.js';
import { FaultWorld } from './world.js';

export const COLLECT_PHASES = ['plan', 'merge', 'removing', 'index'];
/** `make test`'s cells of this group: ones that once found a bug. */
const SAMPLE = ['merge × kill-qsnap'] as const;
const PHASE_FAULTS = FAULTS.filter((f) => f !== 'slow-disk');

interface Ran {
  result: string;
  error?: { code: string; details?: Record<string, unknown> };
}

describe.skipIf(!canRun || !isRoot)('delete: every phase × every fault', () => {
  let world: FaultWorld;
  const results = new Results('delete', COLLECT_PHASES);

  beforeAll(async () => {
    ensureBuilt();
    world = await FaultWorld.open('faults-del');
  });

  afterAll(async () => {
    results.save();
    await world?.close();
  });

  afterEach(() => world?.scrub(), 180_000);

  defineCells(results, COLLECT_PHASES, PHASE_FAULTS, SAMPLE, runCell);

  async function runCell(cell: Cell): Promise<Outcome> {
    const store = cell.fault === 'slow-disk' ? undefined : world.store;
    if (!store && !canThrottle())
      return { result: 'n/a: no blkio throttle here', guest: '', next: '', output: '' };
    const slow = store ? undefined : slowDisk(world.sandbox.root, 64 * 2 ** 20);
    try {
      const target =
        store ?? (await Store.open({ dir: join(slow!.mount, 'store'), stateDir: world.sandbox.state }));
      const [a, b, c] = [world.name(), world.name(), world.name()];
      for (const name of [a, b, c]) await storeSnapshot(target, { qmp: world.guest.vm.qmpPath, name }).result;
      const views = { [a]: await view(target, a), [c]: await view(target, c) };
      const stopsBefore = world.guest.stops;
      const ran = await strike(cell, target, b);
      const next = await world.nextCommands(world.guest.vm.running ? world.guest.vm.qmpPath : undefined);
      if (ran.error) expect(ran.error.details?.['phase'], 'the failure names its phase').toBeDefined();
      const output = await remaining(target, b, views);
      if (target === world.store) await world.expectTidy();
      const guest = await world.guestAfter(stopsBefore);
      await deleteAll(target);
      return { result: ran.result, guest, next, output };
    } finally {
      slow?.undo();
    }
  }

  async function strike(cell: Cell, store: Store, name: string): Promise<Ran> {
    const id = idOf(await store.read(), name);
    if (cell.fault === 'kill-qsnap') {
      const child = spawnCli(['delete', name], {
        ...world.env(),
        QSNAP_FAULT: `kill-at:${cell.phase},slow-merge`,
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
    if (cell.fault === 'qmp-closed') await routeThroughProxy(store, true);
    const undo: (() => void)[] = [];
    let racer: Promise<unknown> | undefined;
    // A merge long enough to be struck in the middle (4 MiB/s) where the merge is the phase.
    const op = collect(store, {
      deleting: [id],
      faults: new Set(cell.phase === 'merge' ? ['slow-merge'] : []),
    });
    let struck = false;
    op.on((e: OperationEvent) => {
      // Once, at the phase's first entry (a phase such as removing is entered once per file).
      if (e.type !== 'phase' || e.phase !== cell.phase || struck) return;
      struck = true;
      if (cell.fault === 'kill-qemu') process.kill(world.guest.vm.pid, 'SIGKILL');
      if (cell.fault === 'qmp-closed') world.proxy!.cut();
      if (cell.fault === 'fs-full') undo.push(fillUp(world.storeDir));
      if (cell.fault === 'dir-removed') undo.push(removeDir(store.snapshotsDir));
      if (cell.fault === 'race') racer = collect(store, { deleting: [id] }).result;
    });
    try {
      await op.result;
      return { result: await raceNote(racer, 'completed') };
    } catch (err) {
      const error = err as Ran['error'] & {};
      return { result: await raceNote(racer, `error ${error.code}`), error };
    } finally {
      if (cell.fault === 'kill-qemu')
        await Promise.race([world.guest.vm.exited, new Promise((r) => setTimeout(r, 3000))]);
      for (const u of undo) u();
      if (cell.fault === 'qmp-closed') await routeThroughProxy(store, false);
    }
  }

  /** The catalog's QMP socket of the VM: through the proxy for `qmp-closed`, direct again after. */
  async function routeThroughProxy(store: Store, on: boolean): Promise<void> {
    await store.transact('test: route QMP', (c) => {
      for (const vm of Object.values(c.vms))
        if (vm.pid === world.guest.vm.pid) vm.qmp = on ? world.proxy!.path : world.guest.vm.qmpPath;
    });
  }

  async function raceNote(racer: Promise<unknown> | undefined, result: string): Promise<string> {
    if (!racer) return result;
    return racer.then(
      () => `${result}; the racer completed too`,
      (err: { code: string }) => `${result}; the racer: ${err.code}`,
    );
  }

  /** The snapshots left read what they read before; the newest restores and checks out. */
  async function remaining(store: Store, deleted: string, views: Record<string, string>): Promise<string> {
    const catalog = await store.read();
    const gone = !Object.values(catalog.snapshots).some((s) => s.name === deleted);
    for (const [name, hash] of Object.entries(views)) {
      if (!Object.values(catalog.snapshots).some((s) => s.name === name)) continue; // dir-removed took its file
      expect(await view(store, name), `disk of ${name}`).toBe(hash);
    }
    const newest = Object.keys(views).at(-1)!;
    if (!world.guest.vm.running) return `${gone ? 'deleted' : 'not deleted'}; the others intact`;
    const r = await storeRestore(store, { name: newest }).result.catch((err: { code: string }) => err.code);
    if (typeof r === 'string') return `${gone ? 'deleted' : 'not deleted'}; the others intact; restore: ${r}`;
    const serial = Object.entries(r.relocated).find(([from]) => from.endsWith('serial.sock'))![1];
    const console_ = await connectConsole(serial);
    await expectCheckOk(console_, `restore of ${newest}`).finally(() => console_.close());
    await killPid(r.pid);
    return `${gone ? 'deleted' : 'not deleted'}; the others intact, one restored, check ok`;
  }

  async function view(store: Store, name: string): Promise<string> {
    const top = Object.values((await store.read()).snapshots).find((s) => s.name === name)!.disks[0]!.top;
    const raw = join(world.sandbox.root, 'view.raw');
    execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', top, raw]);
    try {
      return await sha256File(raw);
    } finally {
      rmSync(raw, { force: true });
    }
  }

  async function deleteAll(store: Store): Promise<void> {
    const ids = Object.keys((await store.read()).snapshots);
    if (ids.length) await collect(store, { deleting: ids }).result;
    await collect(store, { deleting: [] }).result;
  }
});

function idOf(catalog: Awaited<ReturnType<Store['read']>>, name: string): string {
  return Object.values(catalog.snapshots).find((s) => s.name === name)!.id;
}
