/**
 * Shared by the restore, export, CLI-restore and example-harness tests: a scratch area per test
 * file (its own TMPDIR, QSNAP_STATE_DIR and /dev/shm directory, all removed by `dispose`), a
 * register of every QEMU a file starts (stopped by pid even when a test fails), and small
 * helpers around the test guest's command line and console.
 */
import { execFile } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { expect } from 'vitest';
import { type GuestCheck, GuestConsole } from '../../src/guest/console.js';
import type { Vm } from '../../src/vm/launcher.js';
import { getOpt, parseQemuOpts } from '../../src/vm/qemu-opts.js';
import { killPid } from '../support/process.js';

const run = promisify(execFile);

export interface Scratch {
  /** Guest directories, snapshots and overlays (on disk). */
  root: string;
  /** This file's TMPDIR: restore's run directories and snapshot stream sockets land here. */
  tmp: string;
  /** A directory on tmpfs (/dev/shm): shared guest RAM, and snapshots a lazy restore maps. */
  shm: string;
  /** Environment for CLI children: same TMPDIR and QSNAP_STATE_DIR. */
  env: NodeJS.ProcessEnv;
  dispose(): Promise<void>;
}

/** Short names: every unix socket path under root must stay below 108 bytes. */
export async function openScratch(name: string): Promise<Scratch> {
  const root = await mkdtemp(join('/tmp', `qr-${name}-`));
  const tmp = join(root, 'tmp');
  const state = join(root, 'state');
  await Promise.all([mkdir(tmp), mkdir(state)]);
  const shm = await mkdtemp(join('/dev/shm', `qr-${name}-`));
  const saved = { TMPDIR: process.env['TMPDIR'], QSNAP_STATE_DIR: process.env['QSNAP_STATE_DIR'] };
  process.env['TMPDIR'] = tmp;
  process.env['QSNAP_STATE_DIR'] = state;
  return {
    root,
    tmp,
    shm,
    env: { ...process.env, TMPDIR: tmp, QSNAP_STATE_DIR: state },
    async dispose() {
      for (const [key, value] of Object.entries(saved)) {
        if (value === undefined) delete process.env[key];
        else process.env[key] = value;
      }
      await rm(shm, { recursive: true, force: true });
      await rm(root, { recursive: true, force: true });
    },
  };
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
