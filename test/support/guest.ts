/**
 * The real-guest harness: the bundled test guest with a heartbeat tracker (booted, or restored
 * from a snapshot), `expectIntact` (the checks every test runs after every snapshot or failure), the guest's QEMU command line, the
 * console of a (restored) guest, and a register of every QEMU a test file starts.
 *
 * QEMU is always stopped by pid (Vm.stop: quit, SIGTERM, SIGKILL; or killPid), even when a
 * test fails.
 */
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { expect } from 'vitest';
import { openSnapshot } from '../../src/format/index.js';
import { type GuestCheck, GuestConsole } from '../../src/guest/console.js';
import {
  bootTestGuest,
  type TestGuest,
  type TestGuestOptions,
  testGuestSpec,
} from '../../src/guest/test-guest.js';
import { type RestoreResult, restore, snapshot } from '../../src/index.js';
import type { QmpClient } from '../../src/qmp/index.js';
import type { ImageInfo } from '../../src/qmp/qapi.js';
import { buildArgv } from '../../src/vm/args.js';
import { plainFilename } from '../../src/vm/image-chain.js';
import type { Vm } from '../../src/vm/launcher.js';
import { getOpt, parseQemuOpts } from '../../src/vm/qemu-opts.js';
import { VmSpec } from '../../src/vm/spec.js';
import { QEMU } from './env.js';
import { killPid, waitUntil } from './process.js';
import type { Sandbox } from './sandbox.js';

export interface MigrationBaseline {
  capabilities: Record<string, boolean>;
  maxBandwidth: number | undefined;
  /** qsnap's live-precopy changes it too (and must put it back). */
  downtimeLimit: number | undefined;
}

export interface Guest extends TestGuest {
  /** n of the newest heartbeat seen (-1 before the first). */
  lastHeartbeat(): number;
  /** Migration settings before any snapshot: every snapshot must put these back. */
  baseline: MigrationBaseline;
  /** Every STOP event QEMU sent since boot (via the private control monitor). */
  stops: number;
}

export async function bootGuest(sandbox: Sandbox, options: TestGuestOptions = {}): Promise<Guest> {
  const dir = await mkdtemp(join(sandbox.root, 'guest-'));
  return trackGuest(await bootTestGuest({ dir, ...options }));
}

/**
 * A snapshot restored into a new QEMU kept attached to this process, as a Guest: the same
 * directory and sockets as `from` (stop that one first), the restored disk overlay, and the
 * workload's console connected.
 */
export async function restoreGuest(
  from: Pick<TestGuest, 'dir' | 'argv'>,
  file: string,
  options: { lazy: boolean },
): Promise<Guest & { restored: RestoreResult }> {
  const restored = await restore({ file, argv: from.argv, lazy: options.lazy, attached: true }).result;
  const vm = restored.vm!;
  try {
    const guestConsole = await connectConsole(chardevPath(from.argv));
    const guest: TestGuest = {
      vm,
      console: guestConsole,
      dir: from.dir,
      diskFile: restored.disks[0]!.overlayFile,
      argv: from.argv,
      bootSeconds: 0,
      stop: async () => {
        await guestConsole.close().catch(() => undefined);
        await vm.stop();
      },
    };
    return Object.assign(await trackGuest(guest), { restored });
  } catch (err) {
    await vm.stop().catch(() => vm.kill());
    throw err;
  }
}

let mappedFiles = 0;

/**
 * The test guest booted, snapshotted into sandbox.disk, stopped and restored from that file with
 * --lazy: a VM whose main RAM is a private mapping of a file on a disk filesystem, which
 * userfaultfd cannot write-protect (what qsnap's pre-copy strategies are for). `mapped` is the
 * file; the restored VM needs it as long as it runs.
 */
export async function lazyGuestOnDisk(
  sandbox: Sandbox,
  options: TestGuestOptions = {},
): Promise<Guest & { restored: RestoreResult; mapped: string }> {
  const original = await bootGuest(sandbox, options);
  const mapped = join(sandbox.disk, `mapped-${mappedFiles++}.qsnap`);
  let overlay: string;
  try {
    overlay = (await snapshot({ qmp: original.vm.qmpPath, out: mapped }).result).disks[0]!.overlayFile;
  } finally {
    await stopGuest(original);
  }
  // The stopped VM's overlay is in no chain the restored VM uses.
  await rm(overlay, { force: true });
  const argv = options.qemuBinary ? [options.qemuBinary, ...original.argv] : original.argv;
  return Object.assign(await restoreGuest({ dir: original.dir, argv }, mapped, { lazy: true }), { mapped });
}

async function trackGuest(guest: TestGuest): Promise<Guest> {
  let last = -1;
  guest.console.onLine((line) => {
    const m = /^QSNAP-HB n=(\d+) /.exec(line);
    if (m) last = Number(m[1]);
  });
  const result: Guest = Object.assign(guest, {
    lastHeartbeat: () => last,
    baseline: await migrationSettings(guest.vm.qmp),
    stops: 0,
  });
  guest.vm.qmp.on('STOP', () => {
    result.stops++;
  });
  return result;
}

export async function migrationSettings(qmp: QmpClient): Promise<MigrationBaseline> {
  const caps = await qmp.execute('query-migrate-capabilities');
  const params = await qmp.execute('query-migrate-parameters');
  return {
    capabilities: Object.fromEntries(caps.map((c) => [c.capability, c.state])),
    maxBandwidth: params['max-bandwidth'],
    downtimeLimit: params['downtime-limit'],
  };
}

/** Stops the guest and tolerates one that is already gone; never throws in afterAll. */
export async function stopGuest(guest: Guest | undefined): Promise<void> {
  if (!guest) return;
  try {
    const status = await guest.vm.qmp.execute('query-status', undefined, { timeoutMs: 2000 });
    if (!status.running) await guest.vm.qmp.execute('cont', undefined, { timeoutMs: 2000 });
  } catch {
    // gone or wedged: stop() kills it by pid
  }
  await guest.stop().catch(() => guest.vm.kill());
}

/** Every image file of the guest's disk chains (active layer first). */
export async function chainFiles(qmp: QmpClient): Promise<string[]> {
  const files: string[] = [];
  for (const block of await qmp.execute('query-block')) {
    for (let image: ImageInfo | undefined = block.inserted?.image; image; image = image['backing-image']) {
      const name = plainFilename(image.filename);
      if (name) files.push(name);
    }
  }
  return files;
}

/** The guest runs: QEMU says so, a new heartbeat arrives, and the workload's full check passes. */
export async function expectGuestHealthy(guest: Guest): Promise<void> {
  const status = await guest.vm.qmp.execute('query-status');
  expect(status, 'QEMU run state').toMatchObject({ running: true, status: 'running' });
  const before = guest.lastHeartbeat();
  const hb = await guest.console.nextHeartbeat({ timeoutMs: 10_000 });
  expect(hb.n, 'heartbeat counter advances').toBeGreaterThan(before);
  expect(hb.latchedFailures, hb.line).toBe(0);
  const check = await guest.console.check({ timeoutMs: 30_000 });
  expect(check.ok, check.line).toBe(true);
}

export interface LeftoverOptions {
  /** The --out path of the operation: must not exist, or ('valid') must be a sound snapshot. */
  out?: string;
  outIs?: 'absent' | 'valid';
}

/**
 * Nothing of qsnap is left behind: no file at --out (or a valid one), no partial files beside
 * it, no stream directory in TMPDIR, no intent record, migration settings as before, no
 * migration running, no overlay file outside the guest's disk chain.
 */
export async function expectNoLeftovers(
  sandbox: Sandbox,
  guest: Guest | undefined,
  options: LeftoverOptions = {},
): Promise<void> {
  if (options.out) {
    const outIs = options.outIs ?? 'absent';
    if (outIs === 'absent') expect(existsSync(options.out), `${options.out} must not exist`).toBe(false);
    else {
      const reader = await openSnapshot(options.out);
      try {
        await reader.verify();
      } finally {
        await reader.close();
      }
    }
    const dir = resolve(options.out, '..');
    const partial = existsSync(dir) ? (await readdir(dir)).filter((f) => f.includes('.qsnap-partial-')) : [];
    expect(partial, 'partial snapshot files').toEqual([]);
  }
  // A guard lives until QEMU closes the stream, which it does right after the migration ends.
  await waitUntil(() => drainGuards(sandbox).length === 0, 5000, 'drain guards to exit').catch(
    () => undefined,
  );
  expect(drainGuards(sandbox), 'drain guard processes').toEqual([]);
  const streams = (await readdir(sandbox.tmp)).filter((f) => f.startsWith('qsnap-stream-'));
  expect(streams, 'stream directories in TMPDIR').toEqual([]);
  const intents = existsSync(join(sandbox.state, 'intents'))
    ? await readdir(join(sandbox.state, 'intents'))
    : [];
  expect(intents, 'intent records').toEqual([]);
  if (!guest) return;
  const now = await migrationSettings(guest.vm.qmp);
  expect(now.capabilities['background-snapshot'], 'background-snapshot capability').toBe(false);
  expect(now, 'migration settings restored').toEqual(guest.baseline);
  const migrate = await guest.vm.qmp.execute('query-migrate');
  expect(['active', 'setup', 'device', 'cancelling', 'pre-switchover'], 'no migration running').not.toContain(
    migrate.status,
  );
  const chain = new Set(await chainFiles(guest.vm.qmp));
  const images = (await readdir(guest.dir))
    .filter((f) => f.endsWith('.qcow2'))
    .map((f) => join(guest.dir, f));
  expect(
    images.filter((f) => !chain.has(f)),
    'overlay files outside the disk chain',
  ).toEqual([]);
}

/**
 * Drain guards (receiver.ts) started by this sandbox's qsnap runs and still alive (a Node
 * process titled `qsnap-drain-guard`), recognised by the sandbox's TMPDIR in its environment
 * (inherited from qsnap).
 */
export function drainGuards(sandbox: Sandbox): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const argv = readFileSync(`/proc/${entry}/cmdline`, 'latin1').split('\0');
      const guard =
        argv[0] === 'qsnap-drain-guard' || (argv[1] === '-e' && argv[2]?.includes('qsnap drain guard'));
      if (!guard) continue;
      const env = readFileSync(`/proc/${entry}/environ`, 'latin1').split('\0');
      if (env.includes(`TMPDIR=${sandbox.tmp}`)) pids.push(Number(entry));
    } catch {
      // exited while we looked
    }
  }
  return pids;
}

/** The checks every test runs after every snapshot or failure. */
export async function expectIntact(
  sandbox: Sandbox,
  guest: Guest,
  options: LeftoverOptions = {},
): Promise<void> {
  await expectNoLeftovers(sandbox, guest, options);
  await expectGuestHealthy(guest);
}

/**
 * Every QEMU a test file starts, attached (a Vm) or not (a pid): `stopAll` stops each by pid
 * (QMP quit, then signals) and is safe to call from afterEach/afterAll whatever happened.
 */
export class QemuRegister {
  private readonly vms = new Set<Vm>();
  private readonly pids = new Set<number>();

  add<T extends Vm | number>(qemu: T): T {
    if (typeof qemu === 'number') this.pids.add(qemu);
    else this.vms.add(qemu);
    return qemu;
  }

  async stop(qemu: Vm | number): Promise<void> {
    if (typeof qemu === 'number') {
      await killPid(qemu);
      this.pids.delete(qemu);
      return;
    }
    await qemu.stop({ timeoutMs: 3000 }).catch(() => qemu.kill());
    this.vms.delete(qemu);
  }

  async stopAll(): Promise<void> {
    for (const vm of [...this.vms]) await this.stop(vm);
    for (const pid of [...this.pids]) await this.stop(pid);
  }
}

/**
 * The bundled test guest's QEMU command line (TCG), as a user's own scripts would hand it to
 * Machine.launch: the binary, then the arguments built from the guest's spec (disk, kernel,
 * -qmp unix:<guestDir>/qmp.sock, serial chardev socket); and the serial console's socket path.
 */
export function testGuestCommandLine(
  guestDir: string,
  diskFile: string,
): { argv: string[]; serialSocket: string } {
  const spec = VmSpec.parse(testGuestSpec(guestDir, diskFile, { accel: 'tcg' }));
  const built = buildArgv(spec, { runDir: guestDir, accel: 'tcg' });
  return { argv: [QEMU, ...built.argv], serialSocket: built.serial!.socket };
}

/** The value of `-chardev socket,id=<id>,path=…` in a QEMU argv. */
export function chardevPath(argv: readonly string[], id = 'serial0'): string {
  for (let i = 0; i < argv.length - 1; i++) {
    if (argv[i] !== '-chardev') continue;
    const o = parseQemuOpts(argv[i + 1]!, 'backend');
    const path = getOpt(o, 'path');
    if (getOpt(o, 'id') === id && path) return path;
  }
  throw new Error(`no -chardev id=${id} with a path in ${argv.join(' ')}`);
}

/** Connects to a (restored) guest's console and waits for a heartbeat: the workload runs. */
export async function connectConsole(serialSocket: string): Promise<GuestConsole> {
  const guestConsole = await GuestConsole.connect(serialSocket, { timeoutMs: 15_000 });
  await guestConsole.waitReady({ timeoutMs: 30_000 });
  return guestConsole;
}

/** The workload's full check; expects it to pass and returns it. */
export async function expectCheckOk(guestConsole: GuestConsole, what: string): Promise<GuestCheck> {
  const check = await guestConsole.check({ timeoutMs: 60_000 });
  expect(check.ok, `${what}: ${check.line}`).toBe(true);
  return check;
}
