/**
 * The store's promise, on a busy guest: five snapshots, deleted in an order that hits the
 * middle, the oldest (whose frozen layer is the VM's own base image) and the newest. After
 * every delete each remaining snapshot's disk reads exactly what it read before (the hash of
 * its flattened chain), each restores and passes the workload's point-in-time check, and the
 * live VM passes its check and keeps running, never paused by a merge. Then what other tools
 * got wrong: the base image survives (virt-manager #811), a paused VM's snapshot deletes
 * (libvirt #626), a layer a running restored VM holds survives delete and gc.
 */
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { RestoreResult } from '../../src/index.js';
import { collect } from '../../src/store/collect.js';
import { storeRestore } from '../../src/store/restore.js';
import { storeSnapshot } from '../../src/store/snapshot.js';
import { Store } from '../../src/store/store.js';
import { readChain } from '../../src/vm/image-chain.js';
import { canRun } from '../support/env.js';
import { sha256File } from '../support/files.js';
import {
  bootGuest,
  chainFiles,
  connectConsole,
  expectCheckOk,
  expectGuestHealthy,
  type Guest,
  stopGuest,
} from '../support/guest.js';
import { waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe.skipIf(!canRun)('snapshots over time: delete never loses data', () => {
  let sandbox: Sandbox;
  let guest: Guest;
  let store: Store;
  const restored: RestoreResult[] = [];
  /** Hash of each snapshot's flattened disk when it was taken. */
  const views = new Map<string, string>();

  beforeAll(async () => {
    sandbox = await openSandbox('store-life');
    guest = await bootGuest(sandbox);
    store = await Store.open({ dir: join(sandbox.root, 'store'), stateDir: sandbox.state });
  });

  afterEach(async () => {
    for (const r of restored.splice(0)) await r.vm?.stop().catch(() => r.vm?.kill());
  });

  afterAll(async () => {
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  /** The disk a snapshot reads, flattened (qemu-img reads the chain without taking QEMU's locks). */
  async function diskView(name: string): Promise<string> {
    const entry = Object.values((await store.read()).snapshots).find((s) => s.name === name)!;
    const raw = join(sandbox.root, `${name}.raw`);
    execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', entry.disks[0]!.top, raw]);
    try {
      return await sha256File(raw);
    } finally {
      await rm(raw, { force: true });
    }
  }

  async function take(name: string): Promise<void> {
    const r = await storeSnapshot(store, { qmp: guest.vm.qmpPath, name }).result;
    expect(r.cmdline, 'the command line was read from the QEMU process').toBe('recorded');
    views.set(name, await diskView(name));
  }

  /** Restore by name alone (the recorded command line), beside the running VM, and check it. */
  async function restoreAndCheck(name: string, lazy: boolean): Promise<void> {
    const r = await storeRestore(store, { name, lazy, attached: true }).result;
    restored.push(r);
    const serial = Object.entries(r.relocated).find(([from]) => from.endsWith('serial.sock'))?.[1];
    expect(serial, 'the restored VM got its own serial socket').toBeDefined();
    const console_ = await connectConsole(serial!);
    try {
      await expectCheckOk(console_, `restore of ${name}`);
    } finally {
      await console_.close();
    }
  }

  async function expectRemainingIntact(): Promise<void> {
    const names = Object.values((await store.read()).snapshots).map((s) => s.name);
    for (const name of names) expect(await diskView(name), `disk of ${name}`).toBe(views.get(name));
    for (const [i, name] of names.entries()) await restoreAndCheck(name, i % 2 === 1);
    for (const r of restored.splice(0)) await r.vm?.stop();
    await expectGuestHealthy(guest);
  }

  async function deleteOne(name: string) {
    const id = Object.values((await store.read()).snapshots).find((s) => s.name === name)!.id;
    const stopsBefore = guest.stops;
    const result = await collect(store, { deleting: [id] }).result;
    expect(result.deleted).toEqual([name]);
    expect(guest.stops, 'a merge never pauses the guest').toBe(stopsBefore);
    for (const m of result.merged) {
      expect(m.error, `merge into ${m.into}`).toBeUndefined();
      expect(m.pauses).toBe(0);
    }
    return result;
  }

  it('five snapshots of a busy guest, then the middle, the oldest and the newest deleted', async () => {
    const base = (await chainFiles(guest.vm.qmp)).at(-1)!;
    await take('s1');
    const baseHash = await sha256File(base); // frozen from s1 on
    for (const name of ['s2', 's3', 's4', 's5']) await take(name);
    expect((await readChain(guest.diskFile)).length).toBe(1);
    const liveChain = await chainFiles(guest.vm.qmp);
    expect(liveChain).toHaveLength(6);

    const middle = await deleteOne('s3');
    expect(middle.merged.map((m) => m.via)).toEqual(['live']);
    expect(middle.removed.map((f) => f.path)).toContain(liveChain[3]); // s3's frozen layer
    await expectRemainingIntact();

    const oldest = await deleteOne('s1');
    expect(oldest.merged).toEqual([]);
    expect(oldest.kept.map((k) => k.path)).toContain(base);
    // virt-manager #811: deleting the snapshot whose frozen layer is the base image kept it.
    expect(existsSync(base)).toBe(true);
    expect(await sha256File(base), 'the base image is unchanged').toBe(baseHash);
    await expectRemainingIntact();

    const newest = await deleteOne('s5');
    expect(newest.merged.map((m) => [m.into, m.via])).toEqual([[liveChain[0], 'live']]);
    await expectRemainingIntact();

    // What is left: s2 and s4, the VM on an intact chain that is two layers shorter.
    const now = await chainFiles(guest.vm.qmp);
    expect(now).toHaveLength(4);
    expect(now.at(-1)).toBe(base);
    for (const file of now) expect(existsSync(file), file).toBe(true);
  });

  it('deleting every snapshot leaves the running VM on its live overlay over the base image', async () => {
    const ids = Object.values((await store.read()).snapshots).map((s) => s.id);
    const stopsBefore = guest.stops;
    const result = await collect(store, { deleting: ids }).result;
    expect(guest.stops).toBe(stopsBefore);
    expect(result.merged.every((m) => !m.error)).toBe(true);
    const now = await chainFiles(guest.vm.qmp);
    expect(now).toHaveLength(2);
    expect(Object.keys((await store.read()).snapshots)).toEqual([]);
    await expectGuestHealthy(guest);
  });

  it('the running VM’s chain stays bounded (--max-chain): older layers streamed into its overlay, no pause', async () => {
    const all = Object.values((await store.read()).snapshots).map((s) => s.id);
    await collect(store, { deleting: all }).result;
    const stops = guest.stops;
    const taken: string[] = [];
    const shortened: number[] = [];
    for (const name of ['c1', 'c2', 'c3', 'c4']) {
      const r = await storeSnapshot(store, { qmp: guest.vm.qmpPath, name, maxChain: 3 }).result;
      taken.push(name);
      views.set(name, await diskView(name));
      if (r.shortening) shortened.push(r.shortening.from);
    }
    // Four more layers on a chain of at least one: some snapshot took it beyond 3.
    expect(shortened.length).toBeGreaterThan(0);
    expect(shortened.every((n) => n > 3)).toBe(true);
    // c4 waited for the stream c3 started; then its own chain is short again.
    await waitUntil(
      async () => (await guest.vm.qmp.execute('query-jobs')).every((j) => !j.id.startsWith('qsnap-chain-')),
      60_000,
      'the chain stream to end',
    );
    expect((await chainFiles(guest.vm.qmp)).length).toBeLessThanOrEqual(3);
    expect(guest.stops - stops, 'only the four snapshot pauses').toBe(4);
    for (const name of taken) expect(await diskView(name), name).toBe(views.get(name));
    await restoreAndCheck('c1', false);
    await expectGuestHealthy(guest);
  });

  it('a VM restored --lazy from the store (a disk file system) is snapshotted into the store again', async () => {
    await take('lazy-base');
    const r = await storeRestore(store, { name: 'lazy-base', lazy: true, attached: true }).result;
    restored.push(r);
    const again = await storeSnapshot(store, { qmp: r.qmp, name: 'from-lazy' }).result;
    // QEMU cannot write-protect RAM mapped from a file on disk: pre-copy instead (stopped on 7.2 TCG).
    expect(['live-precopy', 'stopped-precopy']).toContain(again.strategy);
    expect(again.cmdline, 'the command line it was restored from').toBe('recorded');
    views.set('from-lazy', await diskView('from-lazy'));
    await restored.pop()!.vm!.stop();
    await restoreAndCheck('from-lazy', true);
    await restoreAndCheck('from-lazy', false);
  });

  it('a paused VM: its snapshot deletes, and the guest stays paused (libvirt #626)', async () => {
    await take('p1');
    await guest.vm.qmp.execute('stop');
    let layer: string;
    try {
      await take('p2');
      const p1 = Object.values((await store.read()).snapshots).find((s) => s.name === 'p1')!;
      layer = p1.disks[0]!.top;
      const deleted = await deleteOne('p1');
      const status = await guest.vm.qmp.execute('query-status');
      expect(status.running, 'qsnap did not resume a guest the user paused').toBe(false);
      // QEMU 7.2 keeps a paused guest's disks inactive after snapshotting it (postmigrate): its
      // layer waits, named, until the guest runs again; QEMU ≥ 9.0 merges it at once.
      if (status.status === 'postmigrate')
        expect(deleted.kept).toContainEqual(
          expect.objectContaining({ path: layer, reason: expect.stringMatching(/inactive/) }),
        );
      else expect(deleted.removed.map((f) => f.path)).toContain(layer);
      expect(await diskView('p2')).toBe(views.get('p2'));
    } finally {
      await guest.vm.qmp.execute('cont');
    }
    await expectGuestHealthy(guest);
    const gc = await collect(store, { deleting: [] }).result;
    expect(gc.merged.every((m) => !m.error && m.pauses === 0)).toBe(true);
    expect(existsSync(layer), 'merged and removed once the guest runs').toBe(false);
    expect(await diskView('p2')).toBe(views.get('p2'));
  });

  it('a layer a running restored VM holds survives delete and gc; gc removes it once that VM stops', async () => {
    await take('held');
    await take('after');
    const r = await storeRestore(store, { name: 'held', attached: true }).result;
    restored.push(r);
    const heldTop = Object.values((await store.read()).snapshots).find((s) => s.name === 'held')!.disks[0]!
      .top;
    const id = Object.values((await store.read()).snapshots).find((s) => s.name === 'held')!.id;
    const deleted = await collect(store, { deleting: [id] }).result;
    expect(deleted.kept).toContainEqual(
      expect.objectContaining({ path: heldTop, reason: expect.stringMatching(/restored VM/) }),
    );
    expect(existsSync(heldTop)).toBe(true);
    const gc = await collect(store, { deleting: [] }).result;
    expect(gc.removed.map((f) => f.path)).not.toContain(heldTop);
    expect(existsSync(heldTop)).toBe(true);
    const serial = Object.entries(r.relocated).find(([from]) => from.endsWith('serial.sock'))![1];
    const console_ = await connectConsole(serial);
    await expectCheckOk(console_, 'the restored VM after delete and gc').finally(() => console_.close());
    await restored.pop()!.vm!.stop();
    const after = await collect(store, { deleting: [] }).result;
    expect(after.removed.map((f) => f.path)).toContain(heldTop);
    expect(after.removed.map((f) => f.path)).toContain(r.disks[0]!.overlayFile);
    expect(await diskView('after')).toBe(views.get('after'));
  });
});
