/**
 * Helpers of the restore and export tests (the sandbox, the QEMU register and the guest's
 * console helpers they share with other folders are in test/support): a second QEMU's command
 * line, overlays, loading a stream into stock QEMU, and restore's overlay files.
 */
import { execFile } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { expect } from 'vitest';
import { bootTestGuest } from '../../src/guest/test-guest.js';
import { snapshot } from '../../src/index.js';
import type { Vm } from '../../src/vm/launcher.js';
import type { QemuRegister } from '../support/guest.js';
import type { Sandbox } from '../support/sandbox.js';

const run = promisify(execFile);

/**
 * The guest's argv with its sockets and serial log moved from `fromDir` to `toDir` (so a second
 * QEMU can run beside the first) and its disk image `fromDisk` replaced by `toDisk`.
 */
export function moveArgv(
  argv: readonly string[],
  moves: { fromDir: string; toDir: string; fromDisk?: string; toDisk?: string },
): string[] {
  return argv.map((arg) => {
    let out = arg;
    if (moves.fromDisk && moves.toDisk) out = out.replaceAll(`=${moves.fromDisk},`, `=${moves.toDisk},`);
    for (const file of ['qmp.sock', 'serial.sock', 'serial.log'])
      out = out.replaceAll(join(moves.fromDir, file), join(moves.toDir, file));
    return out;
  });
}

/** A qcow2 overlay backed by `backing` (absolute path), as restore and export users make them. */
export async function createOverlay(file: string, backing: string): Promise<string> {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', backing, '-F', 'qcow2', file]);
  return file;
}

/**
 * Waits for a stock QEMU started with `-incoming <uri> -S` to finish loading (QEMU leaves it
 * `paused`), then resumes it. Throws with QEMU's log when the load fails.
 */
export async function waitLoadedThenCont(vm: Vm, timeoutMs = 120_000): Promise<number> {
  const started = performance.now();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await vm.qmp.execute('query-status');
    if (status.status === 'paused') break;
    if (status.status !== 'inmigrate' && status.status !== 'prelaunch')
      throw new Error(`QEMU is ${status.status} after loading; log: ${vm.logTail()}`);
    if (Date.now() > deadline) throw new Error(`QEMU did not load within ${timeoutMs} ms`);
    await sleep(20);
  }
  const migrate = await vm.qmp.execute('query-migrate');
  expect(migrate.status, 'incoming migration status').toBe('completed');
  await vm.qmp.execute('cont');
  return performance.now() - started;
}

/** Restore overlays (`<stem>.restore-<tag>.qcow2`) in a directory. */
export function restoreOverlays(dir: string): string[] {
  return readdirSync(dir).filter((f) => /\.restore-[0-9a-f]{8}\.qcow2$/.test(f));
}

/** A snapshot of a freshly booted test guest, taken once its workload beats; the guest is stopped after. */
export interface SnapshotOfFreshGuest {
  argv: string[];
  guestDir: string;
  diskFile: string;
  file: string;
  frozenFile: string;
}

export async function snapshotFreshGuest(
  scratch: Sandbox,
  qemus: QemuRegister,
): Promise<SnapshotOfFreshGuest> {
  const guest = await bootTestGuest({ dir: join(scratch.root, 'guest'), accel: 'tcg' });
  qemus.add(guest.vm);
  await guest.console.nextHeartbeat({ timeoutMs: 20_000 });
  const result = await snapshot({ qmp: guest.vm.qmpPath, out: join(scratch.root, 'vm.qsnap') }).result;
  await guest.console.close();
  await qemus.stop(guest.vm);
  return {
    argv: guest.argv,
    guestDir: guest.dir,
    diskFile: guest.diskFile,
    file: result.file,
    frozenFile: result.disks[0]!.frozenFile,
  };
}
