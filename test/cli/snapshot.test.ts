/**
 * `qsnap snapshot` as a user runs it (node dist/cli/main.js, a child process) against the
 * bundled test guest: --json and text output, the file it writes checked with `verify` and
 * `inspect`, and its errors (exit 1, one line `qsnap: … [CODE]`, or `{ok:false,error}`).
 */
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt } from '../support/build.js';
import { expectCliError, runCli, spawnCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { MiB } from '../support/files.js';
import { bootGuest, chainFiles, expectIntact, type Guest, stopGuest } from '../support/guest.js';
import { waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe.skipIf(!canRun)('qsnap snapshot', () => {
  let sandbox: Sandbox;
  let guest: Guest;

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('cli-snapshot');
    guest = await bootGuest(sandbox);
  });

  afterAll(async () => {
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  it('--json: one JSON result; verify and inspect agree with it', async () => {
    const out = join(sandbox.out, 'json.qsnap');
    const stopsBefore = guest.stops;
    const r = await runCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', out, '--json'], sandbox.env);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(guest.stops - stopsBefore).toBe(1);
    const result = r.json as Record<string, unknown> & { disks: { overlayFile: string }[] };
    expect(result).toMatchObject({
      ok: true,
      file: out,
      strategy: 'background-snapshot',
      machine: 'pc-i440fx-7.2',
      runState: 'running',
      disks: [{ device: 'disk0-dev', frozenFile: guest.diskFile, overlayFile: expect.any(String) }],
    });
    expect(result['downtimeMs']).toBeGreaterThan(0);
    expect(result['downtimeMs']).toBeLessThan(1000);
    expect(result['totalMs']).toBeGreaterThan(result['downtimeMs'] as number);
    expect(result['ramBytes']).toBeGreaterThanOrEqual(256 * MiB);
    console.info(`qsnap snapshot --json: downtime ${(result['downtimeMs'] as number).toFixed(1)} ms`);
    expect(await chainFiles(guest.vm.qmp)).toEqual([result.disks[0]!.overlayFile, guest.diskFile]);
    await expectIntact(sandbox, guest, { out, outIs: 'valid' });

    const verify = await runCli(['verify', out], sandbox.env);
    expect(verify.code, verify.stderr).toBe(0);
    expect(verify.stdout).toMatch(new RegExp(`^ok +${out}: .* verified`, 'm'));
    const verifyJson = await runCli(['verify', out, '--json'], sandbox.env);
    expect(verifyJson.json).toMatchObject({
      ok: true,
      dataPages: result['pagesWritten'],
      zeroPages: result['zeroPages'],
    });

    const inspect = await runCli(['inspect', out, '--json'], sandbox.env);
    expect(inspect.code, inspect.stderr).toBe(0);
    const manifest = (inspect.json as { manifest: Record<string, unknown> }).manifest;
    expect(manifest).toMatchObject({
      id: result['id'],
      strategy: 'background-snapshot',
      qemu: { machine: 'pc-i440fx-7.2', version: { major: 7, minor: 2 } },
      vm: { ramBytes: 256 * MiB, runStateBefore: 'running' },
      counts: { pagesWritten: result['pagesWritten'], zeroPages: result['zeroPages'] },
      disks: [
        {
          device: 'disk0-dev',
          format: 'qcow2',
          frozenFile: guest.diskFile,
          overlayFile: result.disks[0]!.overlayFile,
        },
      ],
      timings: { downtimeMs: result['downtimeMs'] },
    });
    const blocks = (manifest['ram'] as { blocks: { name: string; fileOffset: number }[] }).blocks;
    expect(blocks[0]).toMatchObject({ name: 'pc.ram', usedLength: 256 * MiB, fileOffset: 0 });
    expect(blocks.map((b) => b.name)).toContain('pc.bios');
  });

  it('text output: what was written, the downtime, where the disk now writes', async () => {
    const out = join(sandbox.out, 'text.qsnap');
    const r = await runCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', out], sandbox.env);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr, 'no progress bar without a terminal').toBe('');
    expect(r.stdout).toMatch(new RegExp(`^snapshot +${out}$`, 'm'));
    expect(r.stdout).toMatch(/^downtime +[\d.]+ ms guest paused$/m);
    expect(r.stdout).toMatch(/^point +\S+ \(background-snapshot\)$/m);
    expect(r.stdout).toMatch(
      new RegExp(
        `^disk +disk0-dev: frozen ${guest.dir}/disk\\.qsnap-\\w+\\.qcow2; the VM now writes to `,
        'm',
      ),
    );
    await expectIntact(sandbox, guest, { out, outIs: 'valid' });

    const inspect = await runCli(['inspect', out], sandbox.env);
    expect(inspect.code, inspect.stderr).toBe(0);
    expect(inspect.stdout).toMatch(/^QEMU +7\.2\.\d+, machine pc-i440fx-7\.2, tcg$/m);
    expect(inspect.stdout).toMatch(/^ {2}pc\.ram +256 MiB at 0 /m);
    expect(inspect.stdout).toMatch(/^disk +disk0-dev \(qcow2, /m);
  });

  it('refuses an existing --out without --overwrite, before pausing; replaces it with', async () => {
    const out = join(sandbox.out, 'taken.qsnap');
    writeFileSync(out, 'someone else’s file');
    const stopsBefore = guest.stops;
    const text = await runCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', out], sandbox.env);
    expect(expectCliError(text, 'QSNAP_SNAPSHOT_OUTPUT')).toMatch(/already exists — .*--overwrite/);
    const json = await runCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', out, '--json'], sandbox.env);
    expect(json.code).toBe(1);
    expect(json.json).toMatchObject({
      ok: false,
      error: { code: 'QSNAP_SNAPSHOT_OUTPUT', hint: expect.any(String) },
    });
    expect(guest.stops, 'never paused').toBe(stopsBefore);
    await expectIntact(sandbox, guest, { out: join(sandbox.out, 'unused.qsnap') });

    const replaced = await runCli(
      ['snapshot', '--qmp', guest.vm.qmpPath, '--out', out, '--overwrite', '--json'],
      sandbox.env,
    );
    expect(replaced.code, replaced.stderr).toBe(0);
    await expectIntact(sandbox, guest, { out, outIs: 'valid' });
  });

  it('a QMP socket that is not there: QSNAP_QMP_CONNECT', async () => {
    const out = join(sandbox.out, 'nowhere.qsnap');
    const r = await runCli(['snapshot', '--qmp', join(sandbox.root, 'gone.sock'), '--out', out], sandbox.env);
    expectCliError(r, 'QSNAP_QMP_CONNECT');
    const json = await runCli(
      ['snapshot', '--qmp', join(sandbox.root, 'gone.sock'), '--out', out, '--json'],
      sandbox.env,
    );
    expect(json.json).toMatchObject({ ok: false, error: { code: 'QSNAP_QMP_CONNECT' } });
    await expectIntact(sandbox, guest, { out });
  });

  it('an injected mid-stream failure: exit 1 with the code, the guest running', async () => {
    const out = join(sandbox.out, 'broken.qsnap');
    const r = await runCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', out], {
      ...sandbox.env,
      QSNAP_FAULT: 'stream-error',
    });
    expectCliError(r, 'QSNAP_SNAPSHOT_OUTPUT');
    expect(r.stdout).toBe('');
    await expectIntact(sandbox, guest, { out });
  });

  it('Ctrl-C mid-stream: QSNAP_SNAPSHOT_CANCELLED, the stream drained, the guest running', async () => {
    const out = join(sandbox.out, 'interrupted.qsnap');
    const stopsBefore = guest.stops;
    const c = spawnCli(
      ['snapshot', '--qmp', guest.vm.qmpPath, '--out', out, '--max-bandwidth', '20M'],
      sandbox.env,
    );
    try {
      // The partial file exists once this stream has begun (query-migrate's counters may
      // still be the previous migration's right after the pause).
      await waitUntil(
        async () =>
          guest.stops > stopsBefore &&
          readdirSync(sandbox.out).some((f) => f.startsWith('.interrupted.qsnap.')) &&
          ((await guest.vm.qmp.execute('query-migrate')).ram?.transferred ?? 0) > 8 * MiB,
        30_000,
        'the stream to be under way',
      );
      c.child.kill('SIGINT');
      const r = await c.done;
      expectCliError(r, 'QSNAP_SNAPSHOT_CANCELLED');
      expect((await guest.vm.qmp.execute('query-migrate')).status).toBe('completed');
    } finally {
      c.child.kill('SIGKILL');
      await c.done;
    }
    await expectIntact(sandbox, guest, { out });
  });

  it('usage errors exit 2 with QSNAP_USAGE', async () => {
    const noOut = await runCli(['snapshot', '--qmp', guest.vm.qmpPath], sandbox.env);
    expect(noOut.code).toBe(2);
    expect(noOut.stderr).toMatch(
      /^qsnap: snapshot: give --name <name> \(into the store\) or --out <file> .*\[QSNAP_USAGE\]\n$/,
    );
    const badRate = await runCli(
      [
        'snapshot',
        '--qmp',
        guest.vm.qmpPath,
        '--out',
        join(sandbox.out, 'x.qsnap'),
        '--max-bandwidth',
        'fast',
      ],
      sandbox.env,
    );
    expect(badRate.code).toBe(2);
    expect(badRate.stderr).toMatch(/--max-bandwidth: cannot read "fast" as a size .*\[QSNAP_USAGE\]\n$/);
    const badTransport = await runCli(
      ['snapshot', '--qmp', guest.vm.qmpPath, '--out', join(sandbox.out, 'x.qsnap'), '--transport', 'tcp'],
      sandbox.env,
    );
    expect(badTransport.code).toBe(2);
    expect(badTransport.stderr).toMatch(/--transport is pipe or unix, not tcp .*\[QSNAP_USAGE\]\n$/);
    await expectIntact(sandbox, guest, { out: join(sandbox.out, 'x.qsnap') });
  });
});
