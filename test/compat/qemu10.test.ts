/**
 * qsnap against a QEMU ≥ 9.0 (Debian 13's 10.x, in a chroot set up by scripts/qemu-chroot.sh),
 * whose behaviour differs from 7.2 where it matters: after a background snapshot's capture it
 * restores the run state from before `migrate`, so qsnap itself must resume a running guest —
 * and only after the first RAM section — while a paused guest stays paused (no precopy
 * fallback needed). Runs when QSNAP_QEMU10=1 (make test sets it) and as root.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestConsole } from '../../src/guest/console.js';
import { bootTestGuest, type TestGuest } from '../../src/guest/test-guest.js';
import { restore, snapshot } from '../../src/index.js';
import { isRoot } from '../support/env.js';

const enabled = process.env['QSNAP_QEMU10'] === '1' && isRoot;
const CHROOT = process.env['QSNAP_QEMU10_DIR'] ?? '/var/tmp/qsnap-qemu10';
const WORK = `${CHROOT}-work`;
const script = resolve(import.meta.dirname, '../../scripts/qemu-chroot.sh');

describe.skipIf(!enabled)('QEMU 10 from Debian 13 (version-dependent paths)', () => {
  let qemu = '';
  let dir = '';
  let guest: TestGuest | undefined;
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
    const argv = [qemu, ...g.argv];
    const serial = g.vm.serial!.socket;
    await g.stop(); // the restored QEMU binds the same socket paths
    guest = undefined;
    for (const lazy of [false, true]) {
      const result = await restore({ file: join(dir, 'running.qsnap'), argv, lazy, attached: true }).result;
      try {
        expect(result.runState).toBe('running');
        const restoredConsole = await GuestConsole.connect(serial);
        try {
          expect((await restoredConsole.check()).ok).toBe(true);
        } finally {
          await restoredConsole.close();
        }
      } finally {
        await result.vm!.stop();
        for (const disk of result.disks) rmSync(disk.overlayFile, { force: true });
      }
    }
  });
});
