/**
 * `qsnap export` writes a plain QEMU migration stream: stock QEMU loads it with nothing of qsnap
 * involved — its own command line (built here from the guest's spec, as a user would write it),
 * the disk as a new overlay on the snapshot's frozen layer, `-incoming "exec:cat <stream>"`.
 * Negative control: the same stream over the disk as the VM left it seconds later fails the
 * same check.
 */
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GuestConsole } from '../../src/guest/console.js';
import { bootTestGuest, testGuestSpec } from '../../src/guest/test-guest.js';
import { type SnapshotResult, snapshot } from '../../src/index.js';
import { Vm } from '../../src/vm/launcher.js';
import { ensureBuilt } from '../support/build.js';
import { runCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { connectConsole, QemuRegister } from '../support/guest.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';
import { createOverlay, waitLoadedThenCont } from './helpers.js';

describe.skipIf(!canRun)('qsnap export → stock QEMU -incoming exec:cat', () => {
  let scratch: Sandbox;
  const qemus = new QemuRegister();
  const consoles = new Set<GuestConsole>();
  let snap: SnapshotResult;
  /** The overlay the original VM kept writing after the snapshot (its disk seconds later). */
  let laterDisk: string;
  let stream: string;

  beforeAll(async () => {
    ensureBuilt();
    scratch = await openSandbox('export');
    const guest = await bootTestGuest({ dir: join(scratch.root, 'guest'), accel: 'tcg' });
    qemus.add(guest.vm);
    await guest.console.nextHeartbeat({ timeoutMs: 20_000 });
    snap = await snapshot({ qmp: guest.vm.qmpPath, out: join(scratch.root, 'vm.qsnap') }).result;
    // Let the workload write on for a couple of seconds, then stop the VM: its overlay is "later".
    await guest.console.nextHeartbeat({ timeoutMs: 20_000 });
    await guest.console.nextHeartbeat({ timeoutMs: 20_000 });
    laterDisk = snap.disks[0]!.overlayFile;
    await guest.console.close();
    await qemus.stop(guest.vm);
  });

  afterAll(async () => {
    for (const c of consoles) await c.close().catch(() => undefined);
    await qemus.stopAll();
    await scratch?.dispose();
  });

  /** Stock QEMU from the guest's own spec on `disk`, loading the exported stream. Returns its check. */
  async function loadInStockQemu(name: string, backing: string) {
    const dir = join(scratch.root, name);
    const disk = await createOverlay(join(scratch.root, `${name}.qcow2`), backing);
    // -S: QEMU stays paused once the stream is loaded, and the test resumes it with `cont`.
    const spec = {
      ...testGuestSpec(dir, disk, { accel: 'tcg' }),
      incoming: `exec:cat ${stream}`,
      paused: true,
    };
    const vm = qemus.add(await Vm.launch(spec));
    expect(vm.fullArgv).toContain(`exec:cat ${stream}`);
    const loadMs = await waitLoadedThenCont(vm);
    const c = await connectConsole(vm.serial!.socket);
    consoles.add(c);
    const check = await c.check({ timeoutMs: 60_000 });
    await c.close();
    consoles.delete(c);
    await qemus.stop(vm);
    return { check, loadMs };
  }

  it('exports a QEVM stream', async () => {
    stream = join(scratch.root, 'vm.migration');
    const result = await runCli(['export', snap.file, '--qemu-stream', stream, '--json'], scratch.env);
    expect(result.code, result.stderr).toBe(0);
    expect(result.json).toMatchObject({ ok: true, out: stream, bytes: expect.any(Number) });
    const head = Buffer.alloc(8);
    const handle = await open(stream, 'r');
    await handle.read(head, 0, 8, 0);
    await handle.close();
    // QEMU_VM_FILE_MAGIC "QEVM", QEMU_VM_FILE_VERSION 3 (migration/savevm.c).
    expect(head).toEqual(Buffer.from([0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]));

    const again = await runCli(['export', snap.file, '--qemu-stream', stream], scratch.env);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/\[QSNAP_EXPORT_EXISTS\]\n$/);
  });

  it('stock QEMU loads it on an overlay of the frozen layer, resumes, and check() passes', async () => {
    const { check, loadMs } = await loadInStockQemu('stock', snap.disks[0]!.frozenFile);
    console.log(`stock QEMU loaded the exported stream in ${Math.round(loadMs)} ms: ${check.line}`);
    expect(check.ok, check.line).toBe(true);
  });

  it('negative control: the same stream over the disk as it was seconds later FAILS check() with disk-*', async () => {
    const { check } = await loadInStockQemu('later', laterDisk);
    console.log(`negative control: ${check.line}`);
    expect(check.ok, check.line).toBe(false);
    expect(check.reason).toMatch(/^disk-/);
  });
});
