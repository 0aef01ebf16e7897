/**
 * qsnap against a QEMU ≥ 9.0 (Debian 13's 10.x, in a chroot set up by scripts/qemu-chroot.sh),
 * whose behaviour differs from 7.2 where it matters: after a background snapshot's capture it
 * restores the run state from before `migrate`, so qsnap itself must resume a running guest —
 * and only after the first RAM section — while a paused guest stays paused (no precopy
 * fallback needed). And its TCG dirty tracking is exact (fixed in 9.0), so a VM restored with
 * --lazy from a file on a disk filesystem is snapshotted by live-precopy: proven point-in-time
 * here, with a negative control, and killed in its switchover pause (QEMU 10 also leaves the
 * source `postmigrate` after the migration and resumes it when one is cancelled in
 * `pre-switchover`). Runs when QSNAP_QEMU10=1 (make test sets it) and as root.
 */
import { execFileSync } from 'node:child_process';
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmSync,
  writeSync,
} from 'node:fs';
import { statfs } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Intent } from '../../src/engine/intent.js';
import { TMPFS_MAGIC } from '../../src/engine/ram-protection.js';
import { GuestConsole } from '../../src/guest/console.js';
import { bootTestGuest, type TestGuest } from '../../src/guest/test-guest.js';
import {
  type OperationEvent,
  openSnapshot,
  type RestoreResult,
  restore,
  type SnapshotResult,
  snapshot,
} from '../../src/index.js';
import { collect } from '../../src/store/collect.js';
import { storeSnapshot } from '../../src/store/snapshot.js';
import { Store } from '../../src/store/store.js';
import { ensureBuilt } from '../support/build.js';
import { runCli, spawnCli } from '../support/cli.js';
import { isRoot } from '../support/env.js';
import { failure } from '../support/errors.js';
import { waitUntil } from '../support/process.js';

const enabled = process.env['QSNAP_QEMU10'] === '1' && isRoot;
const CHROOT = process.env['QSNAP_QEMU10_DIR'] ?? '/var/tmp/qsnap-qemu10';
const WORK = `${CHROOT}-work`;
const script = resolve(import.meta.dirname, '../../scripts/qemu-chroot.sh');

describe.skipIf(!enabled)('QEMU 10 from Debian 13 (version-dependent paths)', () => {
  let qemu = '';
  let dir = '';
  let guest: TestGuest | undefined;
  /** The running guest's command line (its QEMU binary aside), for the restores. */
  let restoreArgv: string[] = [];
  let serialSocket = '';

  /** A restore of `file` with the guest's command line, its workload checked; how it loaded. */
  async function restoreAndCheck(file: string, lazy = false): Promise<RestoreResult['loadPath']> {
    const result = await restore({ file, argv: [qemu, ...restoreArgv], lazy, attached: true }).result;
    try {
      expect(result.runState).toBe('running');
      const restoredConsole = await GuestConsole.connect(serialSocket);
      try {
        expect((await restoredConsole.check()).ok).toBe(true);
      } finally {
        await restoredConsole.close();
      }
      return result.loadPath;
    } finally {
      await result.vm!.stop();
      for (const disk of result.disks) rmSync(disk.overlayFile, { force: true });
    }
  }
  const savedEnv = { TMPDIR: process.env['TMPDIR'], QSNAP_STATE_DIR: process.env['QSNAP_STATE_DIR'] };

  beforeAll(() => {
    qemu = execFileSync(script, ['setup', CHROOT, WORK], { encoding: 'utf8', timeout: 600_000 }).trim();
    // Everything QEMU must see (disks, sockets, snapshot files, qsnap's temp files) lives under
    // WORK, which the chroot shows at the same path.
    dir = mkdtempSync(join(WORK, 'run-'));
    process.env['TMPDIR'] = dir;
    process.env['QSNAP_STATE_DIR'] = join(dir, 'state');
  }, 660_000);

  afterAll(async () => {
    await guest?.stop().catch(() => undefined);
    process.env['TMPDIR'] = savedEnv.TMPDIR;
    process.env['QSNAP_STATE_DIR'] = savedEnv.QSNAP_STATE_DIR;
    if (savedEnv.TMPDIR === undefined) delete process.env['TMPDIR'];
    if (savedEnv.QSNAP_STATE_DIR === undefined) delete process.env['QSNAP_STATE_DIR'];
    if (dir) rmSync(dir, { recursive: true, force: true });
    execFileSync(script, ['teardown', CHROOT, WORK]);
  });

  it('snapshots a running guest: qsnap resumes it after the capture, and the guest stays consistent', async () => {
    guest = await bootTestGuest({ dir: join(dir, 'vm'), qemuBinary: qemu, accel: 'tcg' });
    const version = await guest.vm.qmp.execute('query-version');
    expect(version.qemu.major).toBeGreaterThanOrEqual(9);
    const phases: string[] = [];
    const result = await snapshot({ qmp: guest.vm.qmpPath, out: join(dir, 'running.qsnap') }).on((e) => {
      if (e.type === 'phase') phases.push(e.phase);
    }).result;
    expect(result.strategy).toBe('background-snapshot');
    // QEMU in its chroot runs the placeholder of exec: there; qsnap reads its pipe from outside.
    expect(result.transport).toBe('pipe');
    expect(result.downtimeMs).toBeGreaterThan(0);
    // qsnap resumed the guest only once the capture was signalled.
    expect(phases.indexOf('resumed')).toBeGreaterThan(phases.indexOf('captured'));
    expect((await guest.vm.qmp.execute('query-status')).status).toBe('running');
    expect((await guest.console.check()).ok).toBe(true);
  });

  it('snapshots a paused guest with a background snapshot and leaves it paused', async () => {
    const g = guest!;
    await g.vm.qmp.execute('stop');
    const result = await snapshot({ qmp: g.vm.qmpPath, out: join(dir, 'paused.qsnap') }).result;
    expect(result.strategy).toBe('background-snapshot');
    expect(result.runState).toBe('paused');
    expect((await g.vm.qmp.execute('query-status')).status).toBe('paused');
    await g.vm.qmp.execute('cont');
    expect((await g.console.check()).ok).toBe(true);
  });

  it('restores the running guest fully and lazily; the workload check passes after each', async () => {
    const g = guest!;
    restoreArgv = g.argv;
    serialSocket = g.vm.serial!.socket;
    await g.stop(); // the restored QEMU binds the same socket paths
    guest = undefined;
    for (const lazy of [false, true]) {
      // A full restore of a format-2 file: QEMU reads it itself (mapped-ram); lazy maps pc.ram.
      expect(await restoreAndCheck(join(dir, 'running.qsnap'), lazy)).toBe(lazy ? 'stream' : 'mapped-ram');
    }
  });

  it('a full restore through mapped-ram refuses a damaged data page QEMU would read, and leaves nothing', async () => {
    const file = join(dir, 'damaged.qsnap');
    copyFileSync(join(dir, 'running.qsnap'), file);
    const reader = await openSnapshot(file);
    const table = await reader.readPageTable(0);
    const page = table.findIndex((_, i) => !reader.isZeroPage(0, i, table));
    const offset = reader.layout.blocks[0]!.fileOffset + page * 4096 + 100;
    expect(await reader.mappedRamView()).toBeDefined(); // the damage is in RAM only
    await reader.close();
    const fd = openSync(file, 'r+');
    const byte = Buffer.alloc(1);
    readSync(fd, byte, 0, 1, offset);
    writeSync(fd, Buffer.from([byte[0]! ^ 0xff]), 0, 1, offset);
    closeSync(fd);
    const before = new Set(readdirSync(join(dir, 'vm')));
    const err = await failure(restore({ file, argv: [qemu, ...restoreArgv], attached: true }).result);
    expect(err).toMatchObject({ code: 'QSNAP_FILE_CORRUPT', details: { region: 'ram', pageIndex: page } });
    expect(readdirSync(join(dir, 'vm')).filter((f) => !before.has(f))).toEqual([]);
    rmSync(file, { force: true });
    // Positive control: the undamaged file restores the same way.
    expect(await restoreAndCheck(join(dir, 'running.qsnap'))).toBe('mapped-ram');
  });

  it('a full restore from a file QEMU cannot open (outside its chroot) streams it instead', async () => {
    // QEMU runs in the chroot, which shows WORK only: a file in the host's /tmp is not there.
    const outside = mkdtempSync('/tmp/qsnap-qemu10-outside-');
    const file = join(outside, 'running.qsnap');
    copyFileSync(join(dir, 'running.qsnap'), file);
    try {
      expect(await restoreAndCheck(file)).toBe('stream');
    } finally {
      rmSync(outside, { recursive: true, force: true });
    }
  });

  describe('a VM restored with --lazy from a file on a disk filesystem', () => {
    /** The lazily restored VM the tests work on, and its console. */
    let lazy: { result: RestoreResult; console: GuestConsole } | undefined;
    let argv: string[] = [];
    let serial = '';
    let live: SnapshotResult;

    async function restoreAttached(file: string, asLazy: boolean): Promise<NonNullable<typeof lazy>> {
      const result = await restore({ file, argv, lazy: asLazy, attached: true }).result;
      const restoredConsole = await GuestConsole.connect(serial);
      await restoredConsole.waitReady({ timeoutMs: 30_000 });
      return { result, console: restoredConsole };
    }

    async function stopLazy(): Promise<void> {
      await lazy?.console.close();
      await lazy?.result.vm?.stop();
      lazy = undefined;
    }

    beforeAll(async () => {
      ensureBuilt();
      expect((await statfs(dir)).type, `${dir} must not be tmpfs`).not.toBe(TMPFS_MAGIC);
      const booted = await bootTestGuest({ dir: join(dir, 'lazy-vm'), qemuBinary: qemu, accel: 'tcg' });
      argv = [qemu, ...booted.argv];
      serial = booted.vm.serial!.socket;
      try {
        await snapshot({ qmp: booted.vm.qmpPath, out: join(dir, 'mapped.qsnap') }).result;
      } finally {
        await booted.stop();
      }
      lazy = await restoreAttached(join(dir, 'mapped.qsnap'), true);
    }, 180_000);

    afterAll(stopLazy);

    it('is snapshotted by live-precopy: paused once at the switchover, resumed by qsnap after the migration', async () => {
      const seen: OperationEvent[] = [];
      live = await snapshot({ qmp: lazy!.result.qmp, out: join(dir, 'live.qsnap') }).on((e) => seen.push(e))
        .result;
      expect(live).toMatchObject({ strategy: 'live-precopy', runState: 'running' });
      expect(seen.filter((e) => e.type === 'warning')).toEqual([]);
      const all = seen.filter((e) => e.type === 'phase').map((e) => e.type === 'phase' && e.phase);
      // mid-stream comes from the stream's progress, whenever half of RAM has arrived.
      expect(all.filter((p) => p === 'mid-stream')).toHaveLength(1);
      const phases = all.filter((p) => p !== 'mid-stream');
      expect(phases.slice(phases.indexOf('precopy'))).toEqual([
        'precopy',
        'pause',
        'frozen',
        'switchover',
        'stream',
        'device-tail',
        'resumed',
        'finish',
        'published',
      ]);
      expect(live.duplicatePages).toBeGreaterThan(0);
      console.info(
        `QEMU 10 live-precopy: pause ${live.downtimeMs.toFixed(0)} ms, ${live.precopy!.passes} passes in ` +
          `${live.precopy!.precopyMs.toFixed(0)} ms, stream ${(live.streamBytes / 2 ** 20).toFixed(0)} MiB`,
      );
      const vm = lazy!.result.vm!;
      expect((await vm.qmp.execute('query-status')).status).toBe('running');
      expect(
        (await vm.qmp.execute('query-migrate-capabilities')).find(
          (c) => c.capability === 'pause-before-switchover',
        )?.state,
      ).toBe(false);
      expect((await lazy!.console.check()).ok).toBe(true);
    });

    it.each([
      ['full', false],
      ['lazy', true],
    ])('the live-precopy snapshot restores (%s) and the workload check passes', async (_mode, asLazy) => {
      await stopLazy();
      lazy = await restoreAttached(live.file, asLazy);
      const check = await lazy.console.check({ timeoutMs: 60_000 });
      expect(check.ok, check.line).toBe(true);
    });

    it('qsnap killed in the switchover pause: paused until `qsnap status` cancels; QEMU 10 resumes the guest', async () => {
      // Runs lazily from live.qsnap (the lazy restore above).
      const vm = lazy!.result.vm!;
      const c = spawnCli(
        ['snapshot', '--qmp', lazy!.result.qmp, '--out', join(dir, 'killed.qsnap'), '--json'],
        {
          QSNAP_FAULT: 'in-switchover',
        },
      );
      try {
        // in-switchover holds qsnap once the disk is frozen and its intent record says so.
        await waitUntil(
          async () =>
            (await vm.qmp.execute('query-migrate')).status === 'pre-switchover' &&
            frozenInRecord(join(dir, 'state', 'intents')),
          60_000,
          'the switchover pause',
        );
      } finally {
        c.child.kill('SIGKILL');
      }
      expect((await c.done).signal).toBe('SIGKILL');
      expect((await failure(lazy!.console.nextHeartbeat({ timeoutMs: 2000 }))).code).toBe(
        'QSNAP_GUEST_TIMEOUT',
      );
      expect((await vm.qmp.execute('query-status')).status).toBe('finish-migrate');
      const status = await runCli(['status', '--qmp', lazy!.result.qmp, '--json']);
      expect(status.code, status.stderr).toBe(0);
      expect(status.json).toMatchObject({
        runState: 'running',
        recovery: {
          recovered: true,
          resumed: true,
          actions: expect.arrayContaining([
            'cancelled the unfinished migration',
            'restored migration settings',
          ]),
        },
      });
      expect((await lazy!.console.check()).ok).toBe(true);
    });
    it('negative control: the disk frozen when the pre-copy starts, not in its pause, FAILS check() with disk-*', async () => {
      // Runs lazily from live.qsnap (on disk): live-precopy again, with the fault.
      const early = await snapshot({
        qmp: lazy!.result.qmp,
        out: join(dir, 'early.qsnap'),
        faults: new Set(['precopy-freeze-early']),
      }).result;
      expect(early.strategy).toBe('live-precopy');
      await stopLazy();
      lazy = await restoreAttached(early.file, false);
      const check = await lazy.console.check({ timeoutMs: 60_000 });
      console.info(`QEMU 10 negative control (disk frozen early): ${check.line}`);
      expect(check.ok, check.line).toBe(false);
      expect(check.reason).toMatch(/^disk-/);
    });
  });

  it('store: a paused guest’s snapshot deletes with a live merge at once, and the guest stays paused', async () => {
    const own = await bootTestGuest({ dir: join(dir, 'store-vm'), qemuBinary: qemu, accel: 'tcg' });
    try {
      const store = await Store.open({ dir: join(dir, 'store'), stateDir: join(dir, 'state') });
      const take = (name: string) => storeSnapshot(store, { qmp: own.vm.qmpPath, name }).result;
      await take('a');
      await take('b');
      await own.vm.qmp.execute('stop');
      await take('c');
      expect((await own.vm.qmp.execute('query-status')).status, 'QEMU ≥ 9.0 keeps it paused').toBe('paused');
      const id = Object.values((await store.read()).snapshots).find((s) => s.name === 'b')!.id;
      const top = (await store.read()).snapshots[id]!.disks[0]!.top;
      const done = await collect(store, { deleting: [id] }).result;
      expect(done.merged.map((m) => [m.via, m.error, m.pauses])).toEqual([['live', undefined, 0]]);
      expect(done.removed.map((f) => f.path)).toContain(top);
      expect((await own.vm.qmp.execute('query-status')).status).toBe('paused');
      await own.vm.qmp.execute('cont');
      expect((await own.console.check()).ok).toBe(true);
    } finally {
      await own.stop();
    }
  });
});

/** The one intent record in `intents` lists its overlays as in use (qsnap froze the disks). */
function frozenInRecord(intents: string): boolean {
  const file = existsSync(intents) ? readdirSync(intents).find((f) => f.endsWith('.json')) : undefined;
  if (!file) return false;
  const record = JSON.parse(readFileSync(join(intents, file), 'utf8')) as Intent;
  return record.overlays.length > 0 && record.overlays.every((o) => o.inUse);
}
