/**
 * gc and what killed runs leave behind: a qsnap SIGKILLed in the middle of a snapshot whose
 * VM then died too leaves an intent record, a stream directory and a prepared overlay; `qsnap
 * gc` removes them — but never an overlay the guest wrote to (the latest state of that disk).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt } from '../support/build.js';
import { runCli, spawnCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { bootGuest, type Guest, stopGuest } from '../support/guest.js';
import { killPid, waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe.skipIf(!canRun)('gc after killed runs', () => {
  let sandbox: Sandbox;
  let env: NodeJS.ProcessEnv;

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('store-gc');
    env = { ...sandbox.env, QSNAP_STORE: join(sandbox.root, 'store') };
  });

  afterAll(async () => {
    await sandbox?.dispose();
  });

  const intents = () =>
    existsSync(join(sandbox.state, 'intents')) ? readdirSync(join(sandbox.state, 'intents')) : [];

  /** A guest, a `qsnap snapshot` held right after the pause, then both killed. Returns the prepared overlay. */
  async function killBoth(guest: Guest): Promise<string> {
    const child = spawnCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', join(sandbox.out, 'x.qsnap')], {
      ...env,
      QSNAP_FAULT: 'after-stop',
    });
    await waitUntil(
      async () => (await guest.vm.qmp.execute('query-status')).status === 'paused',
      30_000,
      'the pause',
    );
    child.child.kill('SIGKILL');
    await child.done;
    await killPid(guest.vm.pid);
    const overlays = readdirSync(guest.dir).filter((f) => f.includes('.qsnap-'));
    expect(overlays).toHaveLength(1);
    return join(guest.dir, overlays[0]!);
  }

  it('removes the record, the stream directory and the prepared overlay of a VM that is gone', async () => {
    const guest = await bootGuest(sandbox);
    try {
      const overlay = await killBoth(guest);
      expect(intents()).toHaveLength(1);
      const streams = () => readdirSync(sandbox.tmp).filter((f) => f.startsWith('qsnap-stream-'));
      expect(streams()).toHaveLength(1);
      const dry = await runCli(['gc', '--dry-run'], env);
      expect(dry.stdout).toContain(overlay);
      expect(existsSync(overlay), 'a dry run removes nothing').toBe(true);
      const gc = await runCli(['gc'], env);
      expect(gc.code, gc.stderr).toBe(0);
      expect(existsSync(overlay)).toBe(false);
      expect(streams()).toEqual([]);
      expect(intents()).toEqual([]);
    } finally {
      await stopGuest(guest);
    }
  });

  it('keeps a prepared overlay that holds data (negative control: the same run, one write later)', async () => {
    const guest = await bootGuest(sandbox);
    try {
      const overlay = await killBoth(guest);
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write 0 64k', overlay], { stdio: 'ignore' });
      const gc = await runCli(['gc'], env);
      expect(gc.code, gc.stderr).toBe(0);
      expect(existsSync(overlay), 'its data may be the only copy').toBe(true);
      expect(intents()).toEqual([]);
    } finally {
      await stopGuest(guest);
    }
  });
});
