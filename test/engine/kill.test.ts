/**
 * qsnap SIGKILLed in the middle of a snapshot (the CLI as a child process, held at a fault
 * point, then killed by pid):
 *  - between pause and resume: the guest stays paused until the next qsnap command against
 *    that VM finds the intent record, resumes the guest and says so;
 *  - mid-stream: the guest keeps running without anyone's help, because the drain guard reads
 *    the rest of the stream and QEMU finishes the background snapshot; the next command only
 *    tidies up (temp files, migration settings) and keeps the overlay the guest now uses.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, realpathSync, writeFileSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { snapshot } from '../../src/index.js';
import { ensureBuilt } from '../support/build.js';
import { type CliChild, runCli, spawnCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { failure } from '../support/errors.js';
import {
  bootGuest,
  chainFiles,
  drainGuards,
  expectGuestHealthy,
  expectIntact,
  type Guest,
  stopGuest,
} from '../support/guest.js';
import { childrenOf, waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

describe.skipIf(!canRun)('qsnap killed mid-snapshot', () => {
  let sandbox: Sandbox;
  let guest: Guest;
  let child: CliChild | undefined;

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('engine-kill');
    guest = await bootGuest(sandbox);
  });

  afterEach(async () => {
    if (child && child.child.exitCode === null && child.child.signalCode === null)
      child.child.kill('SIGKILL');
    await child?.done;
    child = undefined;
  });

  afterAll(async () => {
    await stopGuest(guest);
    await sandbox?.dispose();
  });

  const intents = async () =>
    existsSync(join(sandbox.state, 'intents')) ? await readdir(join(sandbox.state, 'intents')) : [];

  /** Starts `qsnap snapshot` with a fault point and waits until it has paused the guest. */
  async function startHeld(fault: string, out: string, args: string[] = []): Promise<CliChild> {
    const stopsBefore = guest.stops;
    child = spawnCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', out, '--json', ...args], {
      ...sandbox.env,
      QSNAP_FAULT: fault,
    });
    await waitUntil(
      () => guest.stops > stopsBefore || child?.child.exitCode !== null,
      30_000,
      'qsnap to pause the guest',
    );
    expect(child.child.exitCode, 'qsnap still runs').toBe(null);
    return child;
  }

  async function kill(c: CliChild): Promise<void> {
    c.child.kill('SIGKILL');
    const result = await c.done;
    expect(result.signal).toBe('SIGKILL');
  }

  /** Kill between pause and resume; the guest must stay paused until the next command. */
  async function killWhilePaused(out: string): Promise<void> {
    const c = await startHeld('after-stop', out);
    // The fault point holds qsnap right after `stop`: give it a moment to be sure it is there.
    await waitUntil(
      async () => (await guest.vm.qmp.execute('query-status')).status === 'paused',
      10_000,
      'the pause',
    );
    await kill(c);
    expect(await intents(), 'the dead qsnap left its intent record').toHaveLength(1);
    // Nothing resumes it by itself: no heartbeat for 2 s, still paused.
    const silent = await failure(guest.console.nextHeartbeat({ timeoutMs: 2000 }));
    expect(silent.code).toBe('QSNAP_GUEST_TIMEOUT');
    expect(await guest.vm.qmp.execute('query-status')).toMatchObject({ running: false, status: 'paused' });
    const caps = await guest.vm.qmp.execute('query-migrate-capabilities');
    expect(caps.find((c) => c.capability === 'background-snapshot')?.state).toBe(true);
  }

  it('between pause and resume: `status` resumes the guest and says so (text)', async () => {
    const out = join(sandbox.out, 'killed-paused-1.qsnap');
    await killWhilePaused(out);
    const overlays = (await readdir(guest.dir)).filter((f) => f.includes('.qsnap-'));
    expect(overlays, 'the prepared overlay is still there').toHaveLength(1);

    const status = await runCli(['status', '--qmp', guest.vm.qmpPath], sandbox.env);
    expect(status.code, status.stderr).toBe(0);
    expect(status.stdout).toMatch(
      /^recovered an interrupted qsnap operation: .*resumed the guest left paused/m,
    );
    expect(status.stdout).toMatch(/removed unused overlay/);
    expect(status.stdout).toMatch(/^state\s+running$/m);
    await expectIntact(sandbox, guest, { out });

    // Negative control: with nothing to recover, status says nothing about it.
    const again = await runCli(['status', '--qmp', guest.vm.qmpPath], sandbox.env);
    expect(again.code).toBe(0);
    expect(again.stdout).not.toMatch(/recovered/);
  });

  it('between pause and resume: `status --json` reports the recovery', async () => {
    const out = join(sandbox.out, 'killed-paused-2.qsnap');
    await killWhilePaused(out);
    const status = await runCli(['status', '--qmp', guest.vm.qmpPath, '--json'], sandbox.env);
    expect(status.code, status.stderr).toBe(0);
    expect(status.json).toMatchObject({
      ok: true,
      runState: 'running',
      recovery: {
        recovered: true,
        resumed: true,
        overlaysInUse: [],
        actions: expect.arrayContaining([
          expect.stringMatching(/^resumed the guest left paused/),
          expect.stringMatching(/^removed unused overlay /),
          'restored migration settings',
        ]),
      },
    });
    await expectIntact(sandbox, guest, { out });
    const again = await runCli(['status', '--qmp', guest.vm.qmpPath, '--json'], sandbox.env);
    expect(again.json?.['recovery']).toBeUndefined();
  });

  it('between pause and resume: the next `snapshot` recovers first, says so, and succeeds', async () => {
    await killWhilePaused(join(sandbox.out, 'killed-paused-3.qsnap'));
    const out = join(sandbox.out, 'after-recovery.qsnap');
    const r = await runCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', out], sandbox.env);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(
      /^recovered an interrupted qsnap: resumed the guest left paused .*removed unused overlay/m,
    );
    expect(r.stdout).toMatch(new RegExp(`^snapshot +${out}$`, 'm'));
    await expectIntact(sandbox, guest, { out, outIs: 'valid' });
  });

  // The guard holds the pipe of `migrate exec:` (the default here) or the migration socket.
  it.each(['pipe', 'unix'])(
    'mid-stream (%s): the guest keeps running, the next command tidies up, a fresh snapshot works',
    async (transport) => {
      const out = join(sandbox.out, `killed-streaming-${transport}.qsnap`);
      const chainBefore = await chainFiles(guest.vm.qmp);
      const c = await startHeld('stream-hang', out, ['--transport', transport]);
      // qsnap hangs once 20 MiB have arrived; QEMU cannot send more than the socket buffers hold.
      // (Until the new migration is active, query-migrate still reports the previous one's bytes.)
      await waitUntil(
        async () => {
          const info = await guest.vm.qmp.execute('query-migrate');
          return info.status === 'active' && (info.ram?.transferred ?? 0) > 20 * 2 ** 20;
        },
        30_000,
        'the stream to pass 20 MiB',
      );
      const partial = (await readdir(sandbox.out)).filter((f) =>
        f.startsWith(`.killed-streaming-${transport}.qsnap.`),
      );
      expect(partial, 'the partial file exists while qsnap streams').toHaveLength(1);
      expect((await guest.vm.qmp.execute('query-migrate')).status).toBe('active');
      // Negative control for the leftover check: the guard is there while a stream runs.
      expect(drainGuards(sandbox), 'one drain guard while qsnap streams').toHaveLength(1);
      await kill(c);

      // Nobody has run a qsnap command yet: the drain guard alone lets QEMU finish.
      await waitUntil(
        async () => (await guest.vm.qmp.execute('query-migrate')).status === 'completed',
        60_000,
        'QEMU to finish the background snapshot',
      );
      await expectGuestHealthy(guest);
      expect(await childrenOf(guest.vm.pid), 'no placeholder of exec: left to QEMU').toEqual([]);
      expect(await intents()).toHaveLength(1);

      const status = await runCli(['status', '--qmp', guest.vm.qmpPath, '--json'], sandbox.env);
      expect(status.code, status.stderr).toBe(0);
      const recovery = status.json?.['recovery'] as {
        actions: string[];
        resumed: boolean;
        overlaysInUse: unknown[];
      };
      expect(recovery).toMatchObject({ recovered: true, resumed: false });
      expect(recovery.actions).toEqual(
        expect.arrayContaining(['restored migration settings', expect.stringMatching(/temporary file/)]),
      );
      // The disk was frozen before qsnap died: the guest writes to the new overlay, which stays.
      const chainAfter = await chainFiles(guest.vm.qmp);
      expect(chainAfter.slice(1)).toEqual(chainBefore);
      expect(existsSync(chainAfter[0]!), `${chainAfter[0]} still exists`).toBe(true);
      expect(recovery.overlaysInUse).toEqual([{ device: 'disk0-dev', overlayFile: chainAfter[0] }]);
      await expectIntact(sandbox, guest, { out });

      const fresh = join(sandbox.out, `after-kill-${transport}.qsnap`);
      const r = await snapshot({ qmp: guest.vm.qmpPath, out: fresh }).result;
      expect(r.disks[0]!.frozenFile).toBe(chainAfter[0]);
      await expectIntact(sandbox, guest, { out: fresh, outIs: 'valid' });
    },
  );

  it('recovery trusts QEMU over the record: an overlay in use is kept even if recorded unused', async () => {
    // A record as a qsnap killed between the transaction and its record update leaves it: the
    // guest's active overlay listed as not in use, plus one really unused overlay.
    const [active] = await chainFiles(guest.vm.qmp);
    const block = (await guest.vm.qmp.execute('query-block'))[0]!;
    const unused = join(guest.dir, 'disk.qsnap-0badf00d.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', unused, '1M']);
    await guest.vm.qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'qsnap-0badf00d-0',
      file: { driver: 'file', filename: unused },
    });
    const key = createHash('sha256').update(realpathSync(guest.vm.qmpPath)).digest('hex').slice(0, 24);
    mkdirSync(join(sandbox.state, 'intents'), { recursive: true });
    writeFileSync(
      join(sandbox.state, 'intents', `${key}.json`),
      JSON.stringify({
        version: 1,
        qmp: guest.vm.qmpPath,
        owner: { pid: 2 ** 22 - 3, startTime: 'gone' },
        operation: 'snapshot',
        vmWasRunning: true,
        stage: 'paused',
        tempFiles: [],
        overlays: [
          {
            device: 'disk0-dev',
            node: 'x',
            overlayFile: active,
            overlayNode: block.inserted!['node-name'],
            inUse: false,
          },
          {
            device: 'disk0-dev',
            node: 'x',
            overlayFile: unused,
            overlayNode: 'qsnap-0badf00d-0',
            inUse: false,
          },
        ],
        createdAt: new Date().toISOString(),
      }),
    );
    // And an update the dead qsnap had begun writing (IntentHandle.update: tmp, then rename).
    const partialUpdate = join(sandbox.state, 'intents', `${key}.json.${2 ** 22 - 3}.tmp`);
    writeFileSync(partialUpdate, '{"version": 1, "qmp"');
    const status = await runCli(['status', '--qmp', guest.vm.qmpPath, '--json'], sandbox.env);
    expect(status.code, status.stderr).toBe(0);
    expect(existsSync(partialUpdate), 'the partial update is removed with the record').toBe(false);
    expect(status.json?.['recovery']).toMatchObject({
      recovered: true,
      resumed: false,
      overlaysInUse: [{ device: 'disk0-dev', overlayFile: active }],
      actions: expect.arrayContaining([`removed unused overlay ${unused}`]),
    });
    expect(existsSync(active!), 'the active overlay is kept').toBe(true);
    // Negative control: the really unused one is gone, file and node.
    expect(existsSync(unused)).toBe(false);
    const nodes = await guest.vm.qmp.execute('query-named-block-nodes', { flat: true });
    expect(nodes.map((n) => n['node-name'])).not.toContain('qsnap-0badf00d-0');
    await expectIntact(sandbox, guest);
  });
});

describe.skipIf(!canRun)('without the drain guard (negative control)', () => {
  let sandbox: Sandbox;
  let guest: Guest | undefined;
  let child: CliChild | undefined;

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('engine-noguard');
    guest = await bootGuest(sandbox);
  });

  afterAll(async () => {
    child?.child.kill('SIGKILL');
    await child?.done;
    // The hung guest cannot be put right: SIGKILL it by pid, then let stop() tidy up.
    if (guest?.vm.running) process.kill(guest.vm.pid, 'SIGKILL');
    await guest?.stop().catch(() => undefined);
    await sandbox?.dispose();
  });

  it('a stream closed mid-way hangs the guest: the heartbeat check sees it', async () => {
    const g = guest!;
    const stopsBefore = g.stops;
    child = spawnCli(['snapshot', '--qmp', g.vm.qmpPath, '--out', join(sandbox.out, 'x.qsnap'), '--json'], {
      ...sandbox.env,
      QSNAP_FAULT: 'stream-hang',
    });
    await waitUntil(() => g.stops > stopsBefore, 30_000, 'qsnap to pause the guest');
    await waitUntil(
      async () => ((await g.vm.qmp.execute('query-migrate')).ram?.transferred ?? 0) > 20 * 2 ** 20,
      30_000,
      'the stream to pass 20 MiB',
    );
    const guards = drainGuards(sandbox);
    process.kill(guards[0]!, 'SIGKILL');
    child.child.kill('SIGKILL');
    await child.done;
    // Over the exec: pipe, the placeholder QEMU started holds the pipe too until qsnap kills it
    // (which a qsnap hung by the fault may never have done): it goes as well.
    for (const pid of await childrenOf(g.vm.pid)) process.kill(pid, 'SIGKILL');
    // Every reader of the stream is gone: QEMU 7.2 fails the migration and leaves RAM
    // write-protected. QEMU still says "running", but the guest makes no progress.
    await waitUntil(
      async () => (await g.vm.qmp.execute('query-migrate')).status === 'failed',
      30_000,
      'QEMU to fail the migration',
    );
    expect(await g.vm.qmp.execute('query-status')).toMatchObject({ running: true });
    const hang = await failure(expectGuestHealthy(g));
    expect(hang.code, hang.message).toBe('QSNAP_GUEST_TIMEOUT');
  });
});
