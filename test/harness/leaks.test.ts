/**
 * Nothing left behind, whatever ends the harness: a child process runs a Machine (overlays
 * beside its disk, checkpoint files on /dev/shm, a run directory in its TMPDIR, a QEMU) and
 * is ended by SIGINT, SIGTERM, process.exit(), by simply returning, or by SIGKILL (then the
 * next sweep cleans up). Then the files in the disk directory, /dev/shm, the child's TMPDIR
 * and the QEMU processes are counted: zero left. The control: while the child runs, all of
 * them are there.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Machine, sweepMachines } from '../../src/index.js';
import { ensureBuilt } from '../support/build.js';
import { runCli } from '../support/cli.js';
import { canRun, QEMU, ROOT } from '../support/env.js';
import { isGone, killPid, processesMentioning, waitGone, waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

const CHILD = join(ROOT, 'test/harness/fixtures/child-harness.mjs');

interface Made {
  pid: number;
  sparePid: number;
  runDir: string;
  checkpointDir: string;
}

function machineEntries(dir: string): string[] {
  return readdirSync(dir).filter((f) => f.startsWith('qsnap-machine-'));
}

describe.skipIf(!canRun)('Machine leaves nothing behind', () => {
  let sandbox: Sandbox;
  const shmBefore = new Set<string>();

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('leaks');
    for (const f of machineEntries('/dev/shm')) shmBefore.add(f);
  });

  afterAll(async () => {
    await sandbox?.dispose();
  });

  /** A fresh disk directory and TMPDIR for one child. */
  function world(name: string): { diskDir: string; disk: string; tmp: string } {
    const diskDir = join(sandbox.root, name);
    mkdirSync(diskDir);
    const disk = join(diskDir, 'disk.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '64M']);
    return { diskDir, disk, tmp: mkdtempSync(join(sandbox.tmp, `${name}-`)) };
  }

  function newShm(): string[] {
    return machineEntries('/dev/shm').filter((f) => !shmBefore.has(f));
  }

  async function runChild(
    how: 'wait' | 'exit' | 'forget',
    w: ReturnType<typeof world>,
  ): Promise<{
    made: Made;
    exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
    pid: number;
  }> {
    const child = spawn(process.execPath, [CHILD, w.disk, how], {
      env: { ...sandbox.env, TMPDIR: w.tmp },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
      child.once('exit', (code, signal) => resolve({ code, signal })),
    );
    const made = await new Promise<Made>((resolve, reject) => {
      const lines = createInterface({ input: child.stdout! });
      lines.on('line', (line) => {
        if (line.startsWith('MADE ')) resolve(JSON.parse(line.slice(5)) as Made);
      });
      exited.then((e) => reject(new Error(`child exited before it was ready: ${JSON.stringify(e)}`)));
    });
    return { made, exited, pid: child.pid! };
  }

  function expectAllThere(w: ReturnType<typeof world>, made: Made): void {
    // The control: while the harness runs, each kind of file the test counts exists.
    expect(readdirSync(w.diskDir).length, 'overlays beside the disk').toBeGreaterThan(1);
    expect(existsSync(made.checkpointDir)).toBe(true);
    expect(readdirSync(made.checkpointDir).length).toBeGreaterThan(0);
    expect(machineEntries(w.tmp).length).toBe(1);
    expect(isGone(made.pid)).toBe(false);
    expect(isGone(made.sparePid), 'the warm spare').toBe(false);
  }

  async function expectNothingLeft(w: ReturnType<typeof world>, made: Made): Promise<void> {
    expect(await waitGone(made.pid, 10_000), `QEMU ${made.pid} still runs`).toBe(true);
    expect(await waitGone(made.sparePid, 10_000), `the spare QEMU ${made.sparePid} still runs`).toBe(true);
    expect(readdirSync(w.diskDir), 'files in the disk directory').toEqual(['disk.qcow2']);
    expect(readdirSync(w.tmp), 'files in the temp directory').toEqual([]);
    expect(newShm(), 'entries in /dev/shm').toEqual([]);
  }

  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    it(`${signal} to the harness ends its QEMU and removes its files`, async () => {
      const w = world(signal.toLowerCase());
      const { made, exited, pid } = await runChild('wait', w);
      expectAllThere(w, made);
      process.kill(pid, signal);
      expect((await exited).signal).toBe(signal);
      await expectNothingLeft(w, made);
    });
  }

  it('process.exit() without close() ends its QEMU and removes its files', async () => {
    const w = world('exit');
    const { made, exited } = await runChild('exit', w);
    expect((await exited).code).toBe(0);
    await expectNothingLeft(w, made);
  });

  it('an unclosed Machine does not keep Node alive (and the exit removes its files)', async () => {
    const w = world('forget');
    const { made, exited } = await runChild('forget', w);
    const ended = await Promise.race([
      exited,
      new Promise((r) => setTimeout(() => r('still running'), 10_000)),
    ]);
    expect(ended).toEqual({ code: 0, signal: null });
    await expectNothingLeft(w, made);
  });

  it('after a SIGKILL of the harness, qsnap gc ends its QEMU and removes its files', async () => {
    const w = world('sigkill');
    const { made, exited, pid } = await runChild('wait', w);
    process.kill(pid, 'SIGKILL');
    await exited;
    try {
      // The control: SIGKILL gives the harness no chance; everything is still there.
      expectAllThere(w, made);
      const env = { ...sandbox.env, TMPDIR: w.tmp };
      const store = ['--store', join(sandbox.root, `store-${pid}`)];
      const dry = await runCli(['gc', '--dry-run', ...store], env);
      expect(dry.code, dry.stderr).toBe(0);
      expect(dry.stdout).toContain(`would stop    QEMU pid ${made.pid}`);
      expectAllThere(w, made);
      const gc = await runCli(['gc', '--json', ...store], env);
      expect(gc.code, gc.stderr).toBe(0);
      const swept = gc.json?.['sweptMachines'] as { qemus: number[] };
      expect([...swept.qemus].sort(), 'the QEMU and its warm spare').toEqual(
        [made.pid, made.sparePid].sort(),
      );
      await expectNothingLeft(w, made);
      // And the next Machine sweeps too (nothing is left for it here).
      expect((await sweepMachines(w.tmp)).dirs).toEqual([]);
    } finally {
      await killPid(made.pid);
    }
  });

  it('a harness SIGKILLed while its QEMU starts: the next sweep finds that QEMU by its directory', async () => {
    const w = world('starting');
    // A QEMU that takes a while to start: the harness dies before it answers QMP or is recorded.
    const bin = join(sandbox.root, 'slow-bin');
    mkdirSync(bin);
    const slow = join(bin, 'qemu-system-x86_64');
    writeFileSync(slow, `#!/bin/sh\nsleep 2\nexec ${QEMU} "$@"\n`, { mode: 0o755 });
    const child = spawn(process.execPath, [CHILD, w.disk, 'launching'], {
      env: { ...sandbox.env, TMPDIR: w.tmp, QSNAP_TEST_QEMU: slow },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const exited = new Promise((resolve) => child.once('exit', resolve));
    const qemus = () =>
      processesMentioning(w.tmp).filter((pid) => {
        try {
          return readFileSync(`/proc/${pid}/comm`, 'utf8').startsWith('qemu-');
        } catch {
          return false;
        }
      });
    let qemu: number | undefined;
    try {
      await waitUntil(() => processesMentioning(w.tmp).length > 0, 15_000, 'the slow QEMU started');
      child.kill('SIGKILL');
      await exited;
      await waitUntil(() => qemus().length > 0, 15_000, 'the wrapper exec()ed QEMU');
      qemu = qemus()[0]!;
      // The control: nothing but the sweep stops it (the harness is gone, no ledger names it).
      await new Promise((r) => setTimeout(r, 500));
      expect(isGone(qemu), 'the orphaned QEMU runs on').toBe(false);
      const swept = await sweepMachines(w.tmp);
      expect(swept.qemus).toEqual([qemu]);
      expect(await waitGone(qemu, 10_000), `QEMU ${qemu} still runs`).toBe(true);
      expect(readdirSync(w.tmp), 'files in the temp directory').toEqual([]);
      expect(newShm(), 'entries in /dev/shm').toEqual([]);
    } finally {
      child.kill('SIGKILL');
      if (qemu) await killPid(qemu);
    }
  });

  it('a launch that times out removes what it made, its QEMU too', async () => {
    const w = world('timeout');
    const saved = process.env['TMPDIR'];
    process.env['TMPDIR'] = w.tmp;
    try {
      await expect(
        Machine.launch({
          argv: [QEMU, '-accel', 'tcg', '-m', '64M', '-display', 'none', '-nodefaults', '-name', w.tmp],
          timeoutMs: 1,
        }),
      ).rejects.toMatchObject({ code: 'QSNAP_MACHINE_TIMEOUT' });
    } finally {
      process.env['TMPDIR'] = saved;
    }
    // The QEMU it had started goes once it answers.
    await waitUntil(() => processesMentioning(w.tmp).length === 0, 15_000, 'the late QEMU stopped');
    await waitUntil(() => readdirSync(w.tmp).length === 0, 15_000, 'the machine directory removed');
    expect(newShm()).toEqual([]);
  });

  it('a failed launch removes what it made', async () => {
    const w = world('failed');
    const saved = process.env['TMPDIR'];
    process.env['TMPDIR'] = w.tmp;
    try {
      await expect(
        Machine.launch({
          argv: [QEMU, '-accel', 'tcg', '-display', 'none', '-kernel', join(w.diskDir, 'none')],
        }),
      ).rejects.toMatchObject({ code: 'QSNAP_VM_LAUNCH' });
    } finally {
      process.env['TMPDIR'] = saved;
    }
    expect(readdirSync(w.tmp)).toEqual([]);
    expect(newShm()).toEqual([]);
  });
});
