import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { type LaunchOptions, Vm } from '../vm/launcher.js';
import type { VmSpec } from '../vm/spec.js';
import { GuestConsole } from './console.js';
import { GuestImageError } from './errors.js';

const run = promisify(execFile);

/** images/build of this package (built by `make image`). */
export const IMAGE_DIR = resolve(fileURLToPath(new URL('../../images/build/', import.meta.url)));

export interface TestGuestOptions {
  /** Guest RAM (default 256 MiB). */
  memoryMiB?: number;
  /** Memory the workload keeps rewriting (default 64 MiB). */
  workloadMiB?: number;
  /** Records in the workload's disk ring, 4 KiB each (default 16384 = 64 MiB). */
  slots?: number;
  cpus?: number;
  /** Directory for the disk, sockets and logs (default: a new temp directory, removed on stop). */
  dir?: string;
  /** Back RAM with a file (tests that read or poke guest memory from the host). */
  memoryBackend?: VmSpec['memoryBackend'];
  accel?: VmSpec['accel'];
  /** QEMU to run (default qemu-system-x86_64 from PATH). */
  qemuBinary?: string;
  /** Let QEMU outlive this process (`make vm`). */
  detached?: boolean;
  extraArgs?: string[];
  /** Name of the disk image in `dir` (default disk.qcow2; created when missing). */
  diskName?: string;
  /** Wait for the workload's READY line (default true). */
  waitReady?: boolean;
}

export interface TestGuest {
  vm: Vm;
  console: GuestConsole;
  dir: string;
  diskFile: string;
  /** The QEMU argv this guest runs with (without qsnap's private control monitor): what a user would pass to restore. */
  argv: string[];
  /** Seconds from QEMU start to the workload's READY line. */
  bootSeconds: number;
  stop(): Promise<void>;
}

export function testGuestImage(): { kernel: string; initrd: string } {
  const kernel = join(IMAGE_DIR, 'vmlinuz');
  const initrd = join(IMAGE_DIR, 'initrd.img');
  if (!existsSync(kernel) || !existsSync(initrd)) {
    throw new GuestImageError(IMAGE_DIR);
  }
  return { kernel, initrd };
}

/** The spec of the bundled test guest: Debian's cloud kernel, busybox, the workload on a virtio disk. */
export function testGuestSpec(dir: string, diskFile: string, options: TestGuestOptions = {}): VmSpec {
  const { kernel, initrd } = testGuestImage();
  const workload = options.workloadMiB ?? 64;
  const slots = options.slots ?? 16384;
  return {
    name: 'qsnap-test-guest',
    ...(options.qemuBinary ? { qemuBinary: options.qemuBinary } : {}),
    memoryMiB: options.memoryMiB ?? 256,
    cpus: options.cpus ?? 1,
    accel: options.accel ?? 'auto',
    kernel,
    initrd,
    append: `console=ttyS0 quiet panic=-1 qsnap.mem=${workload} qsnap.slots=${slots}`,
    disks: [{ file: diskFile, format: 'qcow2' }],
    runDir: dir,
    ...(options.memoryBackend ? { memoryBackend: options.memoryBackend } : {}),
    extraArgs: ['-no-reboot', ...(options.extraArgs ?? [])],
  };
}

/** Boot the test guest and wait until its workload runs. */
export async function bootTestGuest(options: TestGuestOptions = {}): Promise<TestGuest> {
  const ownsDir = options.dir === undefined;
  const dir = options.dir ? resolve(options.dir) : await mkdtemp(join(tmpdir(), 'qsnap-guest-'));
  await mkdir(dir, { recursive: true });
  const diskFile = join(dir, options.diskName ?? 'disk.qcow2');
  const slots = options.slots ?? 16384;
  let vm: Vm | undefined;
  let guestConsole: GuestConsole | undefined;
  try {
    if (!existsSync(diskFile)) {
      await run('qemu-img', ['create', '-q', '-f', 'qcow2', diskFile, String(slots * 4096 + 16 * 2 ** 20)]);
    }
    const started = performance.now();
    const launch: LaunchOptions = { detached: options.detached ?? false };
    vm = await Vm.launch(testGuestSpec(dir, diskFile, options), launch);
    guestConsole = await GuestConsole.connect(vm.serial!.socket);
    if (options.waitReady ?? true) await guestConsole.waitReady({ timeoutMs: 120_000 });
    const bootSeconds = (performance.now() - started) / 1000;
    const theVm = vm;
    const theConsole = guestConsole;
    return {
      vm,
      console: guestConsole,
      dir,
      diskFile,
      argv: [...vm.argv],
      bootSeconds,
      stop: async () => {
        await theConsole.close().catch(() => undefined);
        await theVm.stop();
        if (ownsDir) await rm(dir, { recursive: true, force: true });
      },
    };
  } catch (err) {
    await guestConsole?.close().catch(() => undefined);
    await vm?.stop().catch(() => undefined);
    if (ownsDir) await rm(dir, { recursive: true, force: true });
    throw err;
  }
}
