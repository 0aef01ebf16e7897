/**
 * `qsnap restore` as a user runs it: the snapshot, `--`, the VM's own command line. QEMU is
 * started detached, so it outlives the CLI; the test stops it by the pid the CLI printed.
 */
import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { bootTestGuest } from '../../src/guest/test-guest.js';
import { snapshot } from '../../src/index.js';
import { QmpClient } from '../../src/qmp/index.js';
import { ensureBuilt } from '../support/build.js';
import { runCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { chardevPath, connectConsole, expectCheckOk, QemuRegister } from '../support/guest.js';
import { isAlive } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe.skipIf(!canRun)('qsnap restore (CLI)', () => {
  let scratch: Sandbox;
  const qemus = new QemuRegister();
  let argv: string[];
  let file: string;

  beforeAll(async () => {
    ensureBuilt();
    scratch = await openSandbox('cli-restore');
    const guest = await bootTestGuest({ dir: join(scratch.root, 'guest'), accel: 'tcg' });
    qemus.add(guest.vm);
    argv = guest.argv;
    await guest.console.nextHeartbeat({ timeoutMs: 20_000 });
    file = (await snapshot({ qmp: guest.vm.qmpPath, out: join(scratch.root, 'vm.qsnap') }).result).file;
    await guest.console.close();
    await qemus.stop(guest.vm);
  });

  afterEach(async () => {
    await qemus.stopAll();
  });

  afterAll(async () => {
    await qemus.stopAll();
    await scratch?.dispose();
  });

  for (const mode of ['full', 'lazy'] as const) {
    it(`--json${mode === 'lazy' ? ' --lazy' : ''}: one JSON object; QEMU outlives the CLI and runs the guest`, async () => {
      const flags = mode === 'lazy' ? ['--lazy'] : [];
      const result = await runCli(
        ['restore', file, ...flags, '--json', '--', 'qemu-system-x86_64', ...argv],
        scratch.env,
      );
      expect(result.code, result.stderr).toBe(0);
      const json = result.json!;
      expect(json).toMatchObject({
        ok: true,
        mode,
        restoreMs: expect.any(Number),
        loadMs: expect.any(Number),
        pid: expect.any(Number),
        // The command line has a QMP socket: the restored VM listens on the same path.
        qmp: join(scratch.root, 'guest', 'qmp.sock'),
        runState: 'running',
        disks: [{ device: 'disk0-dev', frozenFile: expect.any(String), overlayFile: expect.any(String) }],
      });
      expect(json).not.toHaveProperty('argv');
      const pid = qemus.add(json['pid'] as number);
      console.log(`qsnap restore ${mode}: ${Math.round(json['restoreMs'] as number)} ms (CLI exited)`);

      // The CLI has exited; QEMU has not, and the restored guest passes its check.
      expect(isAlive(pid), `QEMU pid ${pid} after the CLI exited`).toBe(true);
      const guestConsole = await connectConsole(chardevPath(argv));
      try {
        await expectCheckOk(guestConsole, `CLI ${mode} restore`);
      } finally {
        await guestConsole.close();
      }
      await qemus.stop(pid);
      expect(isAlive(pid)).toBe(false);
      const { overlayFile } = (json['disks'] as { overlayFile: string }[])[0]!;
      expect(existsSync(overlayFile)).toBe(true);
      await rm(overlayFile);
      await rm(json['runDir'] as string, { recursive: true, force: true });
    });
  }

  it('--paused leaves the loaded guest paused until the user resumes it over QMP', async () => {
    const result = await runCli(
      ['restore', file, '--paused', '--lazy', '--json', '--', ...argv],
      scratch.env,
    );
    expect(result.code, result.stderr).toBe(0);
    expect(result.json).toMatchObject({ ok: true, runState: 'paused' });
    const pid = qemus.add(result.json!['pid'] as number);
    const qmp = await QmpClient.connect(result.json!['qmp'] as string);
    try {
      expect(await qmp.execute('query-status')).toMatchObject({ running: false, status: 'paused' });
      await qmp.execute('cont');
    } finally {
      await qmp.close();
    }
    const guestConsole = await connectConsole(chardevPath(argv));
    try {
      await expectCheckOk(guestConsole, 'resumed after --paused');
    } finally {
      await guestConsole.close();
    }
    await qemus.stop(pid);
  });

  it('an error is one line on stderr (exit 1), or a JSON error with --json', async () => {
    const wrongRam = argv.map((a, i) => (argv[i - 1] === '-m' ? '512M' : a));
    const text = await runCli(['restore', file, '--', ...wrongRam], scratch.env);
    expect(text.code).toBe(1);
    expect(text.stderr).toMatch(/^qsnap: .+ \[QSNAP_RESTORE_RAM_SIZE\]\n$/);
    const json = await runCli(['restore', file, '--json', '--', ...wrongRam], scratch.env);
    expect(json.code).toBe(1);
    expect(json.json).toMatchObject({ ok: false, error: { code: 'QSNAP_RESTORE_RAM_SIZE' } });
  });

  it('--help prints the usage (exit 0)', async () => {
    const result = await runCli(['restore', '--help'], scratch.env);
    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(/^Usage: qsnap restore <name\|file>/);
    expect(result.stdout).toContain('--lazy');
  });

  it('a missing `--` or a missing file is a usage error (exit 2)', async () => {
    const noDash = await runCli(['restore', file, ...argv.slice(0, 2)], scratch.env);
    expect(noDash.code).toBe(2);
    expect(noDash.stderr).toMatch(/\[QSNAP_USAGE\]\n$/);
    const nothingAfter = await runCli(['restore', file, '--'], scratch.env);
    expect(nothingAfter.code).toBe(2);
    expect(nothingAfter.stderr).toMatch(/\[QSNAP_USAGE\]\n$/);
    const noFile = await runCli(['restore', '--', ...argv], scratch.env);
    expect(noFile.code).toBe(2);
    expect(noFile.stderr).toMatch(/\[QSNAP_USAGE\]\n$/);
  });
});
