/**
 * A VM restored with --lazy maps its main RAM block privately from the snapshot file. On a disk
 * filesystem userfaultfd cannot write-protect that mapping, so QEMU refuses a background
 * snapshot: qsnap snapshots such a VM by pre-copy instead (src/engine/snapshot/switchover.ts,
 * preflight.ts precopyStrategy). The proof that it is point-in-time is the workload's check()
 * after restoring it, full and lazy, with a negative control built the same way but for the
 * instant the disk is frozen.
 *
 * Here (QEMU 7.2, TCG) a live pre-copy would miss guest writes (QEMU's TCG dirty tracking,
 * fixed in 9.0), so the running guest is paused for the whole transfer (stopped-precopy);
 * live-precopy itself is proven the same way on QEMU 10 (test/compat/qemu10.test.ts).
 */
import { statfs } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TMPFS_MAGIC } from '../../src/engine/ram-protection.js';
import { openSnapshot } from '../../src/format/index.js';
import { type OperationEvent, type SnapshotResult, snapshot } from '../../src/index.js';
import { canRun } from '../support/env.js';
import { failure } from '../support/errors.js';
import {
  expectCheckOk,
  expectIntact,
  type Guest,
  lazyGuestOnDisk,
  restoreGuest,
  stopGuest,
} from '../support/guest.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe.skipIf(!canRun)('a VM restored lazily from a file on a disk filesystem is snapshotted again', () => {
  let sandbox: Sandbox;
  /** The VM the test works on now: the lazily restored one, then each restored from its snapshot. */
  let current: Guest | undefined;
  let second: SnapshotResult;
  let expected: 'live-precopy' | 'stopped-precopy';

  beforeAll(async () => {
    sandbox = await openSandbox('lazy-snap');
    expect((await statfs(sandbox.disk)).type, `${sandbox.disk} must not be tmpfs`).not.toBe(TMPFS_MAGIC);
    current = await lazyGuestOnDisk(sandbox);
    const { qemu } = await current.vm.qmp.execute('query-version');
    expected = qemu.major >= 9 ? 'live-precopy' : 'stopped-precopy';
    await expectCheckOk(current.console, 'the lazily restored guest');
  });

  afterAll(async () => {
    await stopGuest(current);
    await sandbox?.dispose();
  });

  async function replaceCurrent(
    file: string,
    lazy: boolean,
  ): Promise<Awaited<ReturnType<typeof restoreGuest>>> {
    const from = current!;
    await stopGuest(from);
    current = undefined;
    const next = await restoreGuest(from, file, { lazy });
    current = next;
    return next;
  }

  it('QEMU refuses it a background snapshot: its RAM cannot be write-protected', async () => {
    const err = await failure(
      current!.vm.qmp.execute('migrate-set-capabilities', {
        capabilities: [{ capability: 'background-snapshot', state: true }],
      }),
    );
    expect(err.message).toMatch(/not compatible with guest memory configuration/);
  });

  it(`qsnap snapshots it anyway, by pre-copy: the guest runs afterwards, nothing is left behind`, async () => {
    const g = current!;
    const out = join(sandbox.disk, 'second.qsnap');
    const events: OperationEvent[] = [];
    second = await snapshot({ qmp: g.vm.qmpPath, out }).on((e) => events.push(e)).result;
    expect(second).toMatchObject({ strategy: expected, runState: 'running' });
    expect(second.downtimeMs).toBeGreaterThan(0);
    const info = events.find((e) => e.type === 'info');
    expect(info?.type === 'info' && info.message).toMatch(`snapshot by ${expected} instead`);
    const warnings = events.filter((e) => e.type === 'warning').map((e) => e.type === 'warning' && e.code);
    expect(warnings).toEqual(expected === 'stopped-precopy' ? ['QSNAP_PRECOPY_STOPPED'] : []);
    const phases = events.filter((e) => e.type === 'phase').map((e) => e.type === 'phase' && e.phase);
    expect(phases.indexOf('resumed'), 'resumed after the migration').toBeGreaterThan(
      phases.indexOf('stream'),
    );
    const reader = await openSnapshot(out);
    try {
      expect(reader.manifest).toMatchObject({ strategy: expected, vm: { runStateBefore: 'running' } });
    } finally {
      await reader.close();
    }
    console.info(
      `${second.strategy}: pause ${second.downtimeMs.toFixed(0)} ms, total ${second.totalMs.toFixed(0)} ms, ` +
        `stream ${(second.streamBytes / 2 ** 20).toFixed(0)} MiB, ${second.duplicatePages} duplicate pages`,
    );
    await expectIntact(sandbox, g, { out, outIs: 'valid' });
  });

  it.each([
    ['full', false],
    ['lazy', true],
  ])(
    'that snapshot restores (%s) and the workload check passes: RAM and disk are of one instant',
    async (_mode, lazy) => {
      const g = await replaceCurrent(second.file, lazy);
      expect(g.restored.runState).toBe('running');
      await expectCheckOk(
        g.console,
        `restore (${lazy ? 'lazy' : 'full'}) of the ${second.strategy} snapshot`,
      );
    },
  );

  it('negative control: the same snapshot with its disk frozen a second before the RAM instant FAILS check() with disk-*', async () => {
    // The VM now runs lazily from second.qsnap (on disk): pre-copy again, with the fault.
    const g = current!;
    const hb = await g.console.nextHeartbeat({ timeoutMs: 20_000 });
    expect(hb.diskIops, 'the workload writes its disk').toBeGreaterThan(0);
    const early = await snapshot({
      qmp: g.vm.qmpPath,
      out: join(sandbox.disk, 'early.qsnap'),
      faults: new Set(['precopy-freeze-early']),
    }).result;
    expect(early.strategy).toBe(expected);
    await expectCheckOk(g.console, 'the source guest after the faulty snapshot');
    const restored = await replaceCurrent(early.file, false);
    const check = await restored.console.check({ timeoutMs: 60_000 });
    console.info(`negative control (${early.strategy}, disk frozen early): ${check.line}`);
    expect(check.ok, `the disk older than RAM must fail: ${check.line}`).toBe(false);
    expect(check.reason).toMatch(/^disk-/);
  });
});
