/**
 * EXAMPLE: a test suite whose every test starts from the same running VM.
 *
 * The pattern, for any VM you start with your own QEMU command line:
 *
 *   beforeAll   Machine.launch({ argv })   start QEMU from your command line
 *               (wait until your guest is ready)
 *               machine.checkpoint()       one live snapshot: RAM, devices and disks
 *   beforeEach  machine.revert(checkpoint) replace QEMU by one restored from the checkpoint
 *   afterAll    machine.close()            stop QEMU, remove overlays and checkpoint files
 *
 * A revert replaces the QEMU process in place: same command line, same QMP socket path and
 * serial socket path, so your test code reconnects to the same paths after each revert. The
 * default revert is lazy (guest RAM is mapped from the checkpoint file), so it takes about
 * the same time whatever the guest's RAM size. Whatever a test did to the guest — memory,
 * disk, devices — the next test does not see it.
 *
 * Take your checkpoints before the first revert, or revert with { mode: 'full' } first: a
 * lazily reverted guest's RAM is a private mapping of the checkpoint file, which QEMU cannot
 * write-protect for the next live snapshot unless that file is on tmpfs (checkpoint() then
 * fails with QSNAP_SNAPSHOT_UNSUPPORTED).
 *
 * Here the VM is qsnap's bundled test guest; its serial console runs a workload whose
 * `check()` verifies the guest's memory and disk, which is how this example shows that each
 * test really starts from the checkpoint.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { type Checkpoint, GuestConsole, Machine, QmpClient } from '../../src/index.js';
import { canRun } from '../support/env.js';
import { testGuestCommandLine } from '../support/guest.js';
import { isAlive, pgrep } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe.skipIf(!canRun)('example: every test starts from one checkpoint of a running VM', () => {
  let scratch: Sandbox;
  let machine: Machine;
  let checkpoint: Checkpoint;
  /** The guest's serial console; the socket path stays the same across reverts. */
  let guestConsole: GuestConsole;
  let serialSocket: string;
  let guestDir: string;
  /** Every QEMU pid this suite ran, to show none is left after close(). */
  const pids: number[] = [];

  beforeAll(async () => {
    scratch = await openSandbox('example');
    guestDir = join(scratch.root, 'guest');

    // 1. The QEMU command line. Yours would come from your own scripts; here it is built from
    //    the test guest's spec (disk, kernel, -qmp unix:…/qmp.sock, serial chardev socket).
    const diskFile = join(guestDir, 'disk.qcow2');
    mkdirSync(guestDir);
    // The workload's disk ring: 16384 records of 4 KiB, plus room.
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', diskFile, String(80 * 2 ** 20)]);
    const commandLine = testGuestCommandLine(guestDir, diskFile);
    serialSocket = commandLine.serialSocket;

    // 2. Start it, and wait until the guest is ready (for the test guest: its workload runs).
    machine = await Machine.launch({ argv: commandLine.argv });
    pids.push(machine.pid);
    guestConsole = await GuestConsole.connect(serialSocket);
    await guestConsole.waitReady({ timeoutMs: 120_000 });

    // 3. Checkpoint once, with the guest running.
    checkpoint = await machine.checkpoint('ready');
    console.log(`checkpoint ${checkpoint.file}: guest paused ${checkpoint.downtimeMs.toFixed(1)} ms`);
  });

  beforeEach(async () => {
    // Every test starts from the checkpoint. The old QEMU goes away, so reconnect the console.
    await guestConsole.close();
    await machine.revert(checkpoint);
    pids.push(machine.pid);
    guestConsole = await GuestConsole.connect(serialSocket);
    await guestConsole.waitReady({ timeoutMs: 30_000 });
  });

  afterAll(async () => {
    await guestConsole?.close().catch(() => undefined);
    if (!machine) {
      await scratch?.dispose();
      return;
    }
    await machine.close();
    // A user's suite ends here. What follows checks that close() left nothing behind.
    try {
      expect(
        pids.filter((pid) => isAlive(pid)),
        'QEMU processes left running',
      ).toEqual([]);
      expect(pgrep(machine.runDir), 'processes using the run directory').toEqual([]);
      if (checkpoint) expect(existsSync(checkpoint.file), 'checkpoint file').toBe(false);
      expect(existsSync(machine.checkpointDir), 'checkpoint directory').toBe(false);
      expect(existsSync(machine.runDir), 'run directory').toBe(false);
      // The guest's own disk stays; every overlay qsnap made beside it is gone.
      expect(readdirSync(guestDir).filter((f) => f.endsWith('.qcow2'))).toEqual(['disk.qcow2']);
    } finally {
      await scratch?.dispose();
    }
  });

  it('a test may break the guest: here it corrupts guest memory, and check() FAILS', async () => {
    // Hold the workload's writers first: otherwise the memory writer may rewrite the corrupted
    // page (it is half a buffer ahead of it) before `check` arrives over the serial line. Held,
    // the guest stays broken until the next revert.
    await guestConsole.hold();
    const corrupted = await guestConsole.corrupt('mem', 'pattern');
    expect(corrupted['kind']).toBe('pattern');
    const check = await guestConsole.check();
    expect(check.ok, check.line).toBe(false);
    expect(check.reason).toBe('mem-pattern');
  });

  it('the next test starts from the checkpoint: check() passes', async () => {
    const check = await guestConsole.check();
    expect(check.ok, check.line).toBe(true);
  });

  it('the QMP socket path stays the same across reverts (a new QEMU listens on it)', async () => {
    expect(machine.qmpPath).toBe(join(guestDir, 'qmp.sock'));
    expect(machine.pid).not.toBe(pids[pids.length - 2]);
    const qmp = await QmpClient.connect(machine.qmpPath);
    try {
      expect(await qmp.execute('query-status')).toMatchObject({ running: true, status: 'running' });
    } finally {
      await qmp.close();
    }
  });

  it('reverts are quick (measured, not asserted)', async () => {
    const reverts = 5;
    const started = performance.now();
    for (let i = 0; i < reverts; i++) {
      const r = await machine.revert(checkpoint);
      pids.push(r.pid);
    }
    const seconds = (performance.now() - started) / 1000;
    console.log(
      `${reverts} reverts in ${seconds.toFixed(2)} s: ${(reverts / seconds).toFixed(2)} reverts/s ` +
        `(${((seconds * 1000) / reverts).toFixed(0)} ms each, lazy, 256 MiB guest, TCG)`,
    );
    // The console of the replaced QEMU is gone; the guest behind the same path answers.
    await guestConsole.close();
    guestConsole = await GuestConsole.connect(serialSocket);
    await guestConsole.waitReady({ timeoutMs: 30_000 });
    const check = await guestConsole.check();
    expect(check.ok, check.line).toBe(true);
  });
});
