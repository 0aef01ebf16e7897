import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { GuestConsole } from '../guest/console.js';
import { type TestGuestOptions, testGuestSpec } from '../guest/test-guest.js';
import { resolveAccel } from '../vm/accel.js';
import { buildArgv } from '../vm/args.js';
import { VmSpec } from '../vm/spec.js';
import type { CallOptions } from './deadline.js';
import { Machine } from './machine.js';

const run = promisify(execFile);

export interface TestGuestCommandLine {
  /** The QEMU command line, binary first: what Machine.launch takes. */
  argv: string[];
  /** The guest's serial console (its workload's protocol: GuestConsole). */
  serialSocket: string;
  qmpSocket: string;
  diskFile: string;
}

/**
 * The command line of qsnap's bundled test guest (Debian's cloud kernel, busybox, a workload
 * whose `check` verifies guest memory and disk) with its disk, sockets and log in `dir`; the
 * disk is created when missing. For trying a checkpoint/revert suite before pointing it at
 * your own VM.
 */
export async function testGuestArgv(
  dir: string,
  options: Omit<TestGuestOptions, 'dir' | 'detached' | 'waitReady'> = {},
): Promise<TestGuestCommandLine> {
  const root = resolve(dir);
  await mkdir(root, { recursive: true });
  const diskFile = join(root, options.diskName ?? 'disk.qcow2');
  const slots = options.slots ?? 16384;
  if (!existsSync(diskFile)) {
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', diskFile, String(slots * 4096 + 16 * 2 ** 20)]);
  }
  const accel = await resolveAccel(options.accel ?? 'auto');
  const spec = VmSpec.parse({ ...testGuestSpec(root, diskFile, options), accel: accel.accel });
  const built = buildArgv(spec, { runDir: root, accel: accel.accel });
  return {
    argv: [spec.qemuBinary, ...built.argv],
    serialSocket: built.serial!.socket,
    qmpSocket: built.qmpPath,
    diskFile,
  };
}

/** The test guest as a Machine, its workload running (`console.check()` verifies memory and disk). */
export async function launchTestGuest(
  dir: string,
  options: Omit<TestGuestOptions, 'dir' | 'detached' | 'waitReady'> & CallOptions = {},
): Promise<{ machine: Machine; console: GuestConsole; commandLine: TestGuestCommandLine }> {
  const commandLine = await testGuestArgv(dir, options);
  const machine = await Machine.launch({ ...options, argv: commandLine.argv });
  try {
    const guestConsole = await GuestConsole.connect(commandLine.serialSocket);
    try {
      await guestConsole.waitReady({ timeoutMs: 120_000 });
    } catch (err) {
      await guestConsole.close();
      throw err;
    }
    return { machine, console: guestConsole, commandLine };
  } catch (err) {
    await machine.close();
    throw err;
  }
}
