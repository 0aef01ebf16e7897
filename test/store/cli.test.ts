/**
 * The store from the command line, as a user drives it: snapshot by name, list, restore by
 * name alone, delete, gc; names and stores that are wrong; a catalog damaged by hand; a layer
 * moved away behind qsnap's back; and qsnap SIGKILLed in the middle of a delete (during a
 * merge) and of a gc — the next command finishes the work and the catalog matches the files.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Store } from '../../src/store/store.js';
import { ensureBuilt } from '../support/build.js';
import { expectCliError, runCli, spawnCli } from '../support/cli.js';
import { canRun, isRoot } from '../support/env.js';
import { sha256File } from '../support/files.js';
import {
  bootGuest,
  connectConsole,
  expectCheckOk,
  expectGuestHealthy,
  type Guest,
  stopGuest,
} from '../support/guest.js';
import { killPid, waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe.skipIf(!canRun)('the store from the CLI', () => {
  let sandbox: Sandbox;
  let guest: Guest;
  let storeDir: string;
  let env: NodeJS.ProcessEnv;
  const pids: number[] = [];

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('store-cli');
    guest = await bootGuest(sandbox);
    storeDir = join(sandbox.root, 'store');
    env = { ...sandbox.env, QSNAP_STORE: storeDir };
  });

  afterAll(async () => {
    for (const pid of pids) await killPid(pid);
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  const qsnap = (...args: string[]) => runCli(args, env);
  const catalog = async () => (await Store.open({ dir: storeDir, stateDir: sandbox.state })).read();
  const entry = async (name: string) =>
    Object.values((await catalog()).snapshots).find((s) => s.name === name)!;
  const snapshotFiles = () => readdirSync(join(storeDir, 'snapshots')).filter((f) => f.endsWith('.qsnap'));

  async function take(name: string, ...extra: string[]) {
    const r = await qsnap('snapshot', '--qmp', guest.vm.qmpPath, '--name', name, ...extra);
    expect(r.code, r.stderr).toBe(0);
    return r;
  }

  /** Restore by name alone, detached as a user's would be; returns its pid and serial socket. */
  async function restoreByName(name: string, ...extra: string[]) {
    const r = await qsnap('restore', name, '--json', ...extra);
    expect(r.code, r.stderr).toBe(0);
    const pid = r.json!['pid'] as number;
    pids.push(pid);
    const relocated = r.json!['relocated'] as Record<string, string>;
    const serial = Object.entries(relocated).find(([from]) => from.endsWith('serial.sock'))![1];
    return { pid, serial, json: r.json! };
  }

  /** Every file the catalog names exists, nothing is pending, no snapshot file is unaccounted for. */
  async function expectCatalogMatchesFiles() {
    const c = await catalog();
    expect(c.operations, 'operations in flight').toEqual([]);
    for (const s of Object.values(c.snapshots))
      expect(existsSync(join(storeDir, 'snapshots', s.file)), s.name).toBe(true);
    for (const l of Object.values(c.layers)) expect(existsSync(l.path), l.path).toBe(true);
    for (const g of c.garbage) expect(existsSync(g.path), g.path).toBe(true);
    expect(snapshotFiles().sort()).toEqual(
      [
        ...Object.values(c.snapshots).map((s) => s.file),
        ...c.garbage.map((g) => g.path.split('/').pop()!),
      ].sort(),
    );
  }

  it('snapshot --name, list, list --tree, restore by name alone, delete', async () => {
    const first = await take('clean');
    expect(first.stdout).toMatch(/^snapshot {2}clean \(store: .*\.qsnap\)$/m);
    expect(first.stdout).toMatch(/^cmdline {3}recorded$/m);
    await take('work');

    const list = await qsnap('list', '--json');
    expect(list.code, list.stderr).toBe(0);
    const rows = list.json!['snapshots'] as Record<string, unknown>[];
    expect(rows.map((r) => [r['name'], r['parent'], r['state'], r['vm'], r['cmdline']])).toEqual([
      ['clean', null, 'ok', 'qsnap-test-guest', 'recorded'],
      ['work', 'clean', 'ok', 'qsnap-test-guest', 'recorded'],
    ]);
    expect((rows[0]!['bytes'] as { total: number }).total).toBeGreaterThan(0);
    const text = await qsnap('list');
    expect(text.stdout).toMatch(/^NAME +VM +TAKEN +PARENT +RAM +ON DISK +PAUSE +STATE$/m);
    expect(text.stdout).toMatch(/^work +qsnap-test-guest .* clean .* ok$/m);
    expect((await qsnap('list', '--tree')).stdout).toBe('clean\n└── work\n');

    const restored = await restoreByName('clean', '--lazy');
    expect(restored.json['runState']).toBe('running');
    expect(restored.json['cmdline']).toBe('recorded');
    const console_ = await connectConsole(restored.serial);
    await expectCheckOk(console_, 'restore of clean by name').finally(() => console_.close());
    await killPid(restored.pid);

    const dry = await qsnap('delete', 'work', '--dry-run');
    expect(dry.stdout).toMatch(/^would delete {2}snapshot work$/m);
    expect(dry.stdout).toMatch(/^would merge .* \(live\)$/m);
    expect((await entry('work')).deleting, 'a dry run changes nothing').toBeUndefined();
    const del = await qsnap('delete', 'work', '--json');
    expect(del.code, del.stderr).toBe(0);
    expect(del.json).toMatchObject({ ok: true, deleted: ['work'] });
    expect((del.json!['merged'] as { pauses: number }[]).every((m) => m.pauses === 0)).toBe(true);
    await expectGuestHealthy(guest);
    const gc = await qsnap('gc');
    expect(gc.code, gc.stderr).toBe(0);
    await expectCatalogMatchesFiles();
  });

  it('a name that is taken: refused before the guest is touched; --overwrite replaces it', async () => {
    const stops = guest.stops;
    const again = await qsnap('snapshot', '--qmp', guest.vm.qmpPath, '--name', 'clean');
    expect(expectCliError(again, 'QSNAP_STORE_EXISTS')).toMatch(/already/);
    expect(guest.stops, 'the guest was not paused').toBe(stops);
    const before = await entry('clean');
    await take('clean', '--overwrite');
    const after = await entry('clean');
    expect(after.id).not.toBe(before.id);
    expect(Object.values((await catalog()).snapshots).filter((s) => s.name === 'clean')).toHaveLength(1);
    expect(existsSync(join(storeDir, 'snapshots', before.file)), 'the replaced file is gone').toBe(false);
    await expectCatalogMatchesFiles();
  });

  it('names that are not names, and names that are not there', async () => {
    for (const bad of ['../escape', 'a/b', '..', '.', 'x'.repeat(65), 'sp ace']) {
      const r = await qsnap('snapshot', '--qmp', guest.vm.qmpPath, '--name', bad);
      expect(expectCliError(r, 'QSNAP_STORE_NAME'), bad).toMatch(/is not a snapshot name/);
    }
    const empty = await qsnap('snapshot', '--qmp', guest.vm.qmpPath, '--name', '');
    expect(empty.code).toBe(2);
    expect(empty.stderr).toMatch(/\[QSNAP_USAGE\]$/m);
    expect(existsSync(join(sandbox.root, 'escape.qsnap'))).toBe(false);
    expectCliError(await qsnap('restore', 'nope'), 'QSNAP_STORE_NOT_FOUND');
    expectCliError(await qsnap('delete', 'nope'), 'QSNAP_STORE_NOT_FOUND');
    expectCliError(await qsnap('delete', '../clean'), 'QSNAP_STORE_NOT_FOUND');
  });

  it('a catalog damaged by hand: a clear error, nothing deleted, all is back once it is', async () => {
    const path = join(storeDir, 'catalog.json');
    const good = readFileSync(path);
    const files = snapshotFiles();
    try {
      writeFileSync(path, '{"format": "qsnap-store", "version": 1, "snapshots": [');
      for (const args of [['list'], ['delete', 'clean'], ['gc'], ['restore', 'clean']])
        expect(expectCliError(await qsnap(...args), 'QSNAP_STORE_CATALOG'), args.join(' ')).toMatch(
          /damaged/,
        );
      writeFileSync(path, JSON.stringify({ format: 'qsnap-store', version: 1, snapshots: 'nope' }));
      expectCliError(await qsnap('gc'), 'QSNAP_STORE_CATALOG');
      expect(snapshotFiles()).toEqual(files);
    } finally {
      writeFileSync(path, good);
    }
    expect((await qsnap('list')).code).toBe(0);
  });

  it('a layer moved away: listed as missing, never "repaired" by deleting, fine once it is back', async () => {
    await take('m1');
    await take('m2');
    const top = (await entry('m2')).disks[0]!.top;
    const aside = `${top}.moved`;
    renameSync(top, aside);
    try {
      const rows = (await qsnap('list', '--json')).json!['snapshots'] as { name: string; state: string }[];
      expect(rows.find((r) => r.name === 'm2')!.state).toBe(`missing ${top}`);
      expect(rows.find((r) => r.name === 'm1')!.state).toBe('ok');
      expectCliError(await qsnap('restore', 'm2'), 'QSNAP_STORE_LAYER');
      const gc = await qsnap('gc', '--json');
      expect(gc.code, gc.stderr).toBe(0);
      expect(gc.json!['removed']).toEqual([]);
      expect(existsSync(aside)).toBe(true);
      expect((await entry('m2')).disks[0]!.top).toBe(top);
    } finally {
      renameSync(aside, top);
    }
    const rows = (await qsnap('list', '--json')).json!['snapshots'] as { name: string; state: string }[];
    expect(rows.find((r) => r.name === 'm2')!.state).toBe('ok');
    await expectCatalogMatchesFiles();
  });

  it.skipIf(!isRoot)(
    'a store on a read-only file system: listed; snapshot refused before the pause',
    async () => {
      const mnt = await sandbox.mountTmpfs('size=64m');
      const roEnv = { ...env, QSNAP_STORE: join(mnt, 'store') };
      expect((await runCli(['list'], roEnv)).code).toBe(0);
      execFileSync('mount', ['-o', 'remount,ro', mnt]);
      const stops = guest.stops;
      const r = await runCli(['snapshot', '--qmp', guest.vm.qmpPath, '--name', 'ro'], roEnv);
      expect(expectCliError(r, 'QSNAP_STORE_ACCESS')).toMatch(/read-only/);
      expect(guest.stops).toBe(stops);
      expect((await runCli(['list'], roEnv)).code).toBe(0);
      await expectGuestHealthy(guest);
    },
  );

  it('qsnap SIGKILLed during a delete’s merge: the next command finishes it, nothing lost', async () => {
    await take('k1');
    await take('k2');
    const k2View = await flatHash((await entry('k2')).disks[0]!.top);
    const victim = (await entry('k1')).disks[0]!.top;
    const child = spawnCli(['delete', 'k1'], { ...env, QSNAP_FAULT: 'slow-merge' });
    await waitUntil(
      async () => (await guest.vm.qmp.execute('query-jobs')).some((j) => j.id.startsWith('qsnap-merge-')),
      30_000,
      'the merge to start',
    );
    child.child.kill('SIGKILL');
    await child.done;
    expect((await entry('k1')).deleting, 'the delete was recorded before the merge').toBe(true);
    const next = await qsnap('list');
    expect(next.code, next.stderr).toBe(0);
    expect(next.stdout).toMatch(/^recovered: finished deleting k1$/m);
    expect(existsSync(victim)).toBe(false);
    expect(await flatHash((await entry('k2')).disks[0]!.top)).toBe(k2View);
    await expectCatalogMatchesFiles();
    await expectGuestHealthy(guest);
    const restored = await restoreByName('k2');
    const console_ = await connectConsole(restored.serial);
    await expectCheckOk(console_, 'k2 after the interrupted delete').finally(() => console_.close());
    await killPid(restored.pid);
  });

  it('qsnap SIGKILLed in the middle of a gc: the next gc finishes, the catalog matches the files', async () => {
    for (let i = 0; i < 2; i++) await killPid((await restoreByName('k2')).pid);
    const plan = await qsnap('gc', '--dry-run', '--json');
    const planned = (plan.json!['plan'] as { remove: { path: string }[] }).remove.map((f) => f.path);
    expect(planned.length).toBeGreaterThanOrEqual(2);
    const child = spawnCli(['gc'], { ...env, QSNAP_FAULT: 'hang-after-removal' });
    await waitUntil(() => planned.some((p) => !existsSync(p)), 30_000, 'the first removal');
    child.child.kill('SIGKILL');
    await child.done;
    expect(planned.filter((p) => existsSync(p)).length, 'the gc was cut short').toBeGreaterThan(0);
    const again = await qsnap('gc');
    expect(again.code, again.stderr).toBe(0);
    for (const p of planned) expect(existsSync(p), p).toBe(false);
    await expectCatalogMatchesFiles();
    expect((await qsnap('list')).code).toBe(0);
  });

  async function flatHash(top: string): Promise<string> {
    const raw = join(sandbox.root, 'flat.raw');
    execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', top, raw]);
    const hash = await sha256File(raw);
    execFileSync('rm', ['-f', raw]);
    return hash;
  }
});
