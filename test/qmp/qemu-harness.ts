/**
 * Starts a real qemu-system-x86_64 for tests: TCG only (/dev/kvm here is a PVM hypervisor that
 * hangs guests), no guest needed, QMP on a unix socket in a fresh temp dir. `stop` kills by pid
 * and removes the dir; call it from afterAll/afterEach so a failing test still cleans up.
 */
import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import { QEMU } from '../support/env.js';

const execFileP = promisify(execFile);

export interface QemuInstance {
  dir: string;
  qmpPath: string;
  process: ChildProcess;
  /** Resolves with the exit code (or signal) once QEMU exits. */
  exited: Promise<number | string | null>;
  stderr(): string;
  stop(): Promise<void>;
}

/** A temp dir for images and sockets, removed by the returned function. */
export async function makeTempDir(): Promise<{ dir: string; remove: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'qsnap-qmp-qemu-'));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

export async function qemuImgCreate(path: string, size: string, backing?: string): Promise<void> {
  const args = [
    'create',
    '-q',
    '-f',
    'qcow2',
    ...(backing ? ['-b', backing, '-F', 'qcow2'] : []),
    path,
    size,
  ];
  await execFileP('qemu-img', args);
}

export async function startQemu(dir: string, extraArgs: string[] = []): Promise<QemuInstance> {
  const qmpPath = join(dir, 'qmp.sock');
  const args = [
    '-accel',
    'tcg',
    '-m',
    '64',
    '-nodefaults',
    '-display',
    'none',
    '-qmp',
    `unix:${qmpPath},server=on,wait=off`,
    '-S',
    ...extraArgs,
  ];
  const child = spawn(QEMU, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr?.setEncoding('utf8').on('data', (text: string) => {
    stderr += text;
  });
  const exited = new Promise<number | string | null>((resolve) => {
    child.once('exit', (code, signal) => resolve(code ?? signal));
    child.once('error', () => resolve('spawn-error'));
  });
  const instance: QemuInstance = {
    dir,
    qmpPath,
    process: child,
    exited,
    stderr: () => stderr,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null && child.pid !== undefined) {
        process.kill(child.pid, 'SIGKILL');
      }
      await exited;
    },
  };
  // QEMU creates the socket before it starts its main loop; wait for it (or for QEMU to die).
  const deadline = Date.now() + 30_000;
  while (!existsSync(qmpPath)) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(`QEMU exited before opening QMP: ${stderr.trim()}`);
    }
    if (Date.now() > deadline) {
      await instance.stop();
      throw new Error(`QEMU did not create ${qmpPath} within 30 s: ${stderr.trim()}`);
    }
    await sleep(20);
  }
  return instance;
}
