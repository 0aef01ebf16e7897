/**
 * Vm against the real qemu-system-x86_64: no guest (`-m 64`, the firmware finds nothing to
 * boot), TCG. Every VM a test starts is tracked and SIGKILLed by pid in afterEach, and its
 * temp directories removed, whether the test passed or not.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient } from '../../src/qmp/index.js';
import { Vm } from '../../src/vm/launcher.js';
import { hasQemu, hasQemuImg, ROOT } from '../support/env.js';
import { failure } from '../support/errors.js';
import { isGone, killPid, processesMentioning, waitGone } from '../support/process.js';
import { withPrivateTmpdir } from './helpers.js';

const VITE_NODE = join(ROOT, 'node_modules', '.bin', 'vite-node');
const CHILD = join(ROOT, 'test', 'vm', 'fixtures', 'launch-child.ts');
const BARE = { memoryMiB: 64, accel: 'tcg', serial: 'none' } as const;

/** Pids and directories to clean up after each test, whatever happened. */
const pids = new Set<number>();
const dirs = new Set<string>();
const clients = new Set<QmpClient>();

function track(vm: Vm): Vm {
  pids.add(vm.pid);
  dirs.add(vm.runDir);
  return vm;
}

async function cleanup(): Promise<void> {
  for (const client of clients) await client.close().catch(() => undefined);
  clients.clear();
  for (const pid of pids) await killPid(pid);
  pids.clear();
  for (const dir of dirs) await rm(dir, { recursive: true, force: true });
  dirs.clear();
}

async function connect(path: string, connectTimeoutMs = 10_000): Promise<QmpClient> {
  const client = await QmpClient.connect(path, { connectTimeoutMs });
  clients.add(client);
  return client;
}

describe.skipIf(!hasQemu)('Vm on the real QEMU', () => {
  afterEach(cleanup);

  describe('a running VM', () => {
    let vm: Vm;
    const shared = { pids: new Set<number>(), dirs: new Set<string>() };

    beforeAll(async () => {
      vm = await Vm.launch({ memoryMiB: 64, serial: 'none', name: 'qsnap-launcher-test' });
      shared.pids.add(vm.pid);
      shared.dirs.add(vm.runDir);
    });

    afterAll(async () => {
      await vm?.stop().catch(() => undefined);
      for (const pid of shared.pids) await killPid(pid);
      for (const dir of shared.dirs) await rm(dir, { recursive: true, force: true });
    });

    it('answers QMP on its control monitor', async () => {
      expect(vm.running).toBe(true);
      expect(await vm.qmp.execute('query-status')).toMatchObject({ status: 'running', running: true });
      expect((await vm.qmp.execute('query-name')).name).toBe('qsnap-launcher-test');
    });

    it('resolved auto to the accelerator it reports, and QEMU runs with it', async () => {
      expect(vm.accel?.accel).toMatch(/^(tcg|kvm)$/);
      if (existsSync('/sys/module/kvm_pvm')) expect(vm.accel?.accel).toBe('tcg');
      const kvm = await vm.qmp.execute('query-kvm');
      expect(kvm.enabled).toBe(vm.accel?.accel === 'kvm');
    });

    it('serves a second client on the public socket while vm.qmp stays connected', async () => {
      expect(vm.qmpPath).not.toBe(vm.controlPath);
      const user = await connect(vm.qmpPath);
      expect((await user.execute('query-status')).status).toBe('running');
      expect((await vm.qmp.execute('query-status')).status).toBe('running');
      await user.close();
      expect((await vm.qmp.execute('query-version')).qemu.major).toBeGreaterThanOrEqual(7);
    });

    it('cannot serve another client on the control socket (why there are two)', async () => {
      const err = await failure(connect(vm.controlPath, 1000));
      expect(err.code).toBe('QSNAP_QMP_CONNECT');
      expect((await vm.qmp.execute('query-status')).running).toBe(true);
    });

    it('keeps the argv a user would run apart from the one with the control monitor', () => {
      expect(vm.argv).not.toContain('-mon');
      expect(vm.fullArgv.slice(0, vm.argv.length)).toEqual(vm.argv);
      expect(vm.fullArgv).toContain('-mon');
    });
  });

  it('stop() ends QEMU, leaves no process and removes the run directory; a second stop() is a no-op', async () => {
    const vm = track(await Vm.launch(BARE));
    expect(isGone(vm.pid)).toBe(false); // control: the check sees a live QEMU
    const info = await vm.stop();
    expect(info).toEqual({ code: 0, signal: null }); // QMP quit worked
    expect(vm.running).toBe(false);
    expect(isGone(vm.pid)).toBe(true);
    expect(() => process.kill(vm.pid, 0)).toThrow(expect.objectContaining({ code: 'ESRCH' }));
    expect(existsSync(vm.runDir)).toBe(false);
    expect(await vm.stop()).toEqual(info);
  });

  it('stops a wedged QEMU (SIGSTOPped) with SIGKILL', async () => {
    const vm = track(await Vm.launch(BARE));
    process.kill(vm.pid, 'SIGSTOP');
    const info = await vm.stop({ timeoutMs: 500 });
    expect(info.signal).toBe('SIGKILL');
    expect(isGone(vm.pid)).toBe(true);
    expect(existsSync(vm.runDir)).toBe(false);
  });

  it('reports a QEMU that exits during start-up with its message, leaving nothing behind', async () => {
    const { result, error, leftovers } = await withPrivateTmpdir(() =>
      Vm.launch({ ...BARE, extraArgs: ['-device', 'qsnap-no-such-device'] }),
    );
    if (result) track(result);
    const err = error as Error & { code: string; details: { log: string } };
    expect(err.code).toBe('QSNAP_VM_LAUNCH');
    expect(err.message).toContain('qsnap-no-such-device'); // QEMU's own complaint
    const runDir = dirname(err.details.log);
    expect(existsSync(runDir)).toBe(false);
    expect(processesMentioning(runDir)).toEqual([]);
    expect(leftovers).toEqual([]);
  });

  it('reports a missing QEMU binary as QSNAP_VM_NO_QEMU, leaving nothing behind', async () => {
    const { result, error, leftovers } = await withPrivateTmpdir(() =>
      Vm.launch({ ...BARE, qemuBinary: 'qemu-system-nonexistent' }),
    );
    if (result) track(result);
    expect((error as { code?: string }).code).toBe('QSNAP_VM_NO_QEMU');
    expect(leftovers).toEqual([]);
  });

  it('launchArgv runs a raw argv and owns its run directory when told to', async () => {
    const runDir = await mkdtemp(join(tmpdir(), 'qsnap-launcher-raw-'));
    dirs.add(runDir);
    const qmpPath = join(runDir, 'qmp.sock');
    const argv = [
      '-nodefaults',
      '-display',
      'none',
      '-accel',
      'tcg',
      '-m',
      '64',
      '-S',
      '-qmp',
      `unix:${qmpPath},server=on,wait=off`,
    ];
    const vm = track(await Vm.launchArgv(argv, { qmpPath, runDir, ownsRunDir: true }));
    expect(vm.argv).toEqual(argv);
    expect(vm.accel).toBeUndefined();
    expect((await vm.qmp.execute('query-status')).status).toBe('prelaunch'); // -S took effect
    const user = await connect(qmpPath);
    expect((await user.execute('query-status')).running).toBe(false);
    await vm.stop();
    expect(isGone(vm.pid)).toBe(true);
    expect(existsSync(runDir)).toBe(false);
  });

  it.skipIf(!hasQemuImg)('escapes commas in every path it passes to QEMU', async () => {
    const base = await mkdtemp(join(tmpdir(), 'qsnap-launcher-commas-'));
    dirs.add(base);
    const runDir = join(base, 'run,dir');
    await mkdir(runDir);
    const disk = join(base, 'a,b.qcow2');
    await new Promise<void>((ok, fail) =>
      spawn('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '16M']).once('exit', (code) =>
        code === 0 ? ok() : fail(new Error(`qemu-img exited ${code}`)),
      ),
    );
    const vm = track(await Vm.launch({ ...BARE, serial: {}, runDir, disks: [{ file: disk }] }));
    expect(vm.qmpPath).toBe(join(runDir, 'qmp.sock'));
    const user = await connect(vm.qmpPath);
    const [block] = await user.execute('query-block');
    expect(block?.inserted?.image.filename).toBe(disk);
    expect(existsSync(vm.serial!.socket)).toBe(true);
    await vm.stop();
    expect(existsSync(runDir)).toBe(true); // not made by qsnap, so not removed
  });

  describe('a VM launched by another process', () => {
    /** Runs the child; resolves with what it printed once it has exited. */
    async function runChild(mode: 'detached' | 'attached') {
      const child = spawn(VITE_NODE, [CHILD, mode], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (t: string) => {
        stdout += t;
        const line = /^(\{.*\})$/m.exec(stdout)?.[1];
        if (line) {
          const info = JSON.parse(line) as { pid: number; runDir: string };
          pids.add(info.pid);
          dirs.add(info.runDir);
        }
      });
      child.stderr.setEncoding('utf8').on('data', (t: string) => {
        stderr += t;
      });
      const code = await new Promise<number | null>((ok) => child.once('exit', ok));
      const line = /^(\{.*\})$/m.exec(stdout)?.[1];
      if (code !== 0 || !line) throw new Error(`launch child exited ${code}: ${stderr}`);
      return JSON.parse(line) as { pid: number; qmpPath: string; runDir: string };
    }

    it('survives the launching process when detached', async () => {
      const info = await runChild('detached');
      await new Promise((r) => setTimeout(r, 300));
      expect(isGone(info.pid)).toBe(false);
      const user = await connect(info.qmpPath);
      expect((await user.execute('query-name')).name).toBe('qsnap-launch-child');
      expect((await user.execute('query-status')).running).toBe(true);
    });

    it('dies with the launching process when not detached (control)', async () => {
      const info = await runChild('attached');
      expect(await waitGone(info.pid)).toBe(true);
      expect(existsSync(info.runDir)).toBe(false);
    });
  });
});
