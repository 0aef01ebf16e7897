/**
 * live-precopy against a VM that QEMU cannot give a background snapshot (restored with --lazy
 * from a file on a disk filesystem): the sequence (pre-copy while the guest runs, one pause at
 * the switchover, the disks frozen in it, the guest resumed after the migration completed), its
 * failure paths (each leaves the guest running, the disks as before, the settings restored) and
 * a qsnap killed in the switchover pause (the guest stays paused until the next command).
 *
 * On QEMU 7.2 under TCG qsnap would not use live-precopy (its dirty tracking misses writes,
 * preflight.ts); the fault `live-precopy-on-tcg` makes it, because what these tests check is
 * the sequence and the clean-up, not the snapshot's content (test/restore/lazy-snapshot.test.ts
 * and test/compat/qemu10.test.ts prove that).
 */
import { existsSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { FaultPoint } from '../../src/engine/faults.js';
import type { Intent } from '../../src/engine/intent.js';
import { openSnapshot } from '../../src/format/index.js';
import { type OperationEvent, type SnapshotResult, snapshot } from '../../src/index.js';
import type { QmpEvent } from '../../src/qmp/index.js';
import { ensureBuilt } from '../support/build.js';
import { type CliChild, runCli, spawnCli } from '../support/cli.js';
import { canRun } from '../support/env.js';
import { failure } from '../support/errors.js';
import {
  chainFiles,
  drainGuards,
  expectIntact,
  type Guest,
  lazyGuestOnDisk,
  stopGuest,
} from '../support/guest.js';
import { waitUntil } from '../support/process.js';
import { openSandbox, type Sandbox } from '../support/sandbox.js';

const LIVE: FaultPoint[] = ['live-precopy-on-tcg'];

describe.skipIf(!canRun)('live-precopy of a VM whose RAM cannot be write-protected', () => {
  let sandbox: Sandbox;
  let guest: Guest;
  let child: CliChild | undefined;
  const events: QmpEvent[] = [];

  beforeAll(async () => {
    ensureBuilt();
    sandbox = await openSandbox('engine-precopy');
    guest = await lazyGuestOnDisk(sandbox);
    for (const name of ['STOP', 'RESUME'] as const) guest.vm.qmp.on(name, (e) => events.push(e));
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

  /** The one intent record of this sandbox, as its owner last wrote it (written by rename). */
  async function intentRecord(): Promise<Intent | undefined> {
    const file = (await intents()).find((f) => f.endsWith('.json'));
    if (!file) return undefined;
    return JSON.parse(await readFile(join(sandbox.state, 'intents', file), 'utf8')) as Intent;
  }

  /** A snapshot expected to fail; the disk chain must be as before it. */
  async function failing(
    name: string,
    faults: FaultPoint[],
    run?: (op: ReturnType<typeof snapshot>) => void,
  ) {
    const stopsBefore = guest.stops;
    const chainBefore = await chainFiles(guest.vm.qmp);
    const out = join(sandbox.out, `${name}.qsnap`);
    const op = snapshot({ qmp: guest.vm.qmpPath, out, faults: new Set([...LIVE, ...faults]) });
    run?.(op);
    const err = (await failure(op.result)) as Error & { code: string; details: Record<string, unknown> };
    expect(await chainFiles(guest.vm.qmp), 'the disk chain is as before').toEqual(chainBefore);
    return { err, out, paused: guest.stops > stopsBefore };
  }

  it('sends RAM while the guest runs and pauses it once, at the switchover, the disk frozen in that pause', async () => {
    const out = join(sandbox.out, 'live.qsnap');
    const seen: OperationEvent[] = [];
    const stopsBefore = guest.stops;
    const eventsBefore = events.length;
    const chainBefore = await chainFiles(guest.vm.qmp);
    const r: SnapshotResult = await snapshot({ qmp: guest.vm.qmpPath, out, faults: new Set(LIVE) }).on((e) =>
      seen.push(e),
    ).result;
    expect(r).toMatchObject({ strategy: 'live-precopy', runState: 'running' });
    const all = seen.filter((e) => e.type === 'phase').map((e) => e.type === 'phase' && e.phase);
    // mid-stream comes from the stream's progress, whenever half of RAM has arrived.
    expect(all.filter((p) => p === 'mid-stream')).toHaveLength(1);
    const phases = all.filter((p) => p !== 'mid-stream');
    expect(phases).toEqual([
      'connect',
      'probe',
      'intent',
      'prepare',
      'prepared',
      'migrating',
      'precopy',
      'pause',
      'frozen',
      'switchover',
      'stream',
      'device-tail',
      'resumed',
      'finish',
      'published',
    ]);
    // One pause, QEMU's switchover stop to qsnap's `cont`, timed by QEMU's events.
    expect(guest.stops - stopsBefore, 'exactly one pause').toBe(1);
    const [stop, resume] = events.slice(eventsBefore);
    expect([stop?.event, resume?.event]).toEqual(['STOP', 'RESUME']);
    expect(r.downtimeMs).toBeCloseTo((resume!.timestampUs - stop!.timestampUs) / 1000, 3);
    // QEMU's default limit, doubled for every 5 s the pre-copy took to converge (a busy host).
    const doublings = Math.log2(r.precopy!.downtimeLimitMs / 300);
    expect(Number.isInteger(doublings) && doublings >= 0, `limit ${r.precopy!.downtimeLimitMs}`).toBe(true);
    expect(doublings).toBeLessThanOrEqual(Math.ceil(r.precopy!.precopyMs / 5000));
    expect(r.precopy!.passes).toBeGreaterThanOrEqual(2);
    expect(r.precopy!.precopyMs).toBeLessThan(r.totalMs);
    // Pre-copy resends what the guest dirtied: the stream holds more pages than RAM has.
    expect(r.duplicatePages).toBeGreaterThan(0);
    expect(r.pagesWritten + r.zeroPages).toBe(r.ramBytes / 4096);
    const reader = await openSnapshot(out);
    try {
      expect(reader.manifest).toMatchObject({
        strategy: 'live-precopy',
        counts: { duplicatePages: r.duplicatePages, precopyPasses: r.precopy!.passes },
        timings: { precopyMs: r.precopy!.precopyMs },
      });
    } finally {
      await reader.close();
    }
    expect(await chainFiles(guest.vm.qmp)).toEqual([r.disks[0]!.overlayFile, ...chainBefore]);
    console.info(
      `live-precopy: pause ${r.downtimeMs.toFixed(0)} ms after ${r.precopy!.passes} passes in ${r.precopy!.precopyMs.toFixed(0)} ms, ` +
        `total ${r.totalMs.toFixed(0)} ms, stream ${(r.streamBytes / 2 ** 20).toFixed(0)} MiB (${r.duplicatePages} pages resent)`,
    );
    await expectIntact(sandbox, guest, { out, outIs: 'valid' });
  });

  it('fails in the switchover pause: the migration is cancelled, QEMU resumes the guest, the disk is committed back', async () => {
    const { err, out, paused } = await failing('switchover-error', ['switchover-error']);
    expect(err.code).toBe('QSNAP_SNAPSHOT_MIGRATION');
    expect(err.message).toMatch(/injected fault/);
    expect(paused).toBe(true);
    expect(err.details['guest']).toBe('running');
    expect(err.details['cleanup']).toEqual(
      expect.arrayContaining(['migration cancelled', expect.stringMatching(/is back on its original image/)]),
    );
    expect((await guest.vm.qmp.execute('query-migrate')).status).toBe('cancelled');
    await expectIntact(sandbox, guest, { out });
  });

  it('the receiver fails during the pre-copy: the guest was never paused, nothing is left', async () => {
    const { err, out, paused } = await failing('stream-error', ['stream-error']);
    expect(err.code).toBe('QSNAP_SNAPSHOT_OUTPUT');
    expect(paused, 'the guest ran throughout').toBe(false);
    expect(err.details['guest']).toBe('running');
    expect(drainGuards(sandbox), 'a pre-copy stream is closed, not drained').toEqual([]);
    expect(['failed', 'cancelled']).toContain((await guest.vm.qmp.execute('query-migrate')).status);
    await expectIntact(sandbox, guest, { out });
  });

  it('cancelled during the pre-copy: QSNAP_SNAPSHOT_CANCELLED, the guest never paused', async () => {
    const { err, out, paused } = await failing('cancelled', [], (op) =>
      op.on((e) => {
        if (e.type === 'phase' && e.phase === 'precopy') op.cancel();
      }),
    );
    expect(err.code).toBe('QSNAP_SNAPSHOT_CANCELLED');
    expect(paused).toBe(false);
    // Cancelled by qsnap, or failed first when qsnap closed its end of the stream.
    expect(err.details['cleanup']).toEqual(
      expect.arrayContaining([
        expect.stringMatching(/^(migration cancelled|the migration ended \((failed|cancelled)\))$/),
      ]),
    );
    expect(['failed', 'cancelled']).toContain((await guest.vm.qmp.execute('query-migrate')).status);
    await expectIntact(sandbox, guest, { out });
  });

  it('qsnap killed in the switchover pause: the guest stays paused until `qsnap status` cancels the migration', async () => {
    const out = join(sandbox.out, 'killed.qsnap');
    const chainBefore = await chainFiles(guest.vm.qmp);
    child = spawnCli(['snapshot', '--qmp', guest.vm.qmpPath, '--out', out, '--json'], {
      ...sandbox.env,
      QSNAP_FAULT: [...LIVE, 'in-switchover'].join(','),
    });
    // The fault holds qsnap in the pause once the disk is frozen and its record says so (it
    // writes that record last), before migrate-continue.
    await waitUntil(
      async () =>
        (await guest.vm.qmp.execute('query-migrate')).status === 'pre-switchover' &&
        (await intentRecord())?.overlays.every((o) => o.inUse) === true,
      60_000,
      'qsnap to freeze the disk in the switchover pause',
    );
    expect((await chainFiles(guest.vm.qmp)).length).toBe(chainBefore.length + 1);
    child.child.kill('SIGKILL');
    expect((await child.done).signal).toBe('SIGKILL');
    expect(await intents(), 'the dead qsnap left its intent record').toHaveLength(1);
    // Nothing resumes it by itself: no heartbeat for 2 s, QEMU still waiting in pre-switchover.
    const silent = await failure(guest.console.nextHeartbeat({ timeoutMs: 2000 }));
    expect(silent.code).toBe('QSNAP_GUEST_TIMEOUT');
    expect(await guest.vm.qmp.execute('query-status')).toMatchObject({
      running: false,
      status: 'finish-migrate',
    });
    expect((await guest.vm.qmp.execute('query-migrate')).status).toBe('pre-switchover');

    const status = await runCli(['status', '--qmp', guest.vm.qmpPath, '--json'], sandbox.env);
    expect(status.code, status.stderr).toBe(0);
    const chainAfter = await chainFiles(guest.vm.qmp);
    expect(status.json).toMatchObject({
      runState: 'running',
      recovery: {
        recovered: true,
        resumed: true,
        actions: expect.arrayContaining([
          'cancelled the unfinished migration',
          expect.stringMatching(/^the guest left finish-migrate by qsnap pid \d+ runs again$/),
          'restored migration settings',
        ]),
        // Frozen before qsnap died: the guest writes to the new overlay, which stays.
        overlaysInUse: [{ device: 'disk0-dev', overlayFile: chainAfter[0] }],
      },
    });
    expect(chainAfter.slice(1)).toEqual(chainBefore);
    expect((await guest.vm.qmp.execute('query-migrate')).status).toBe('cancelled');
    await expectIntact(sandbox, guest, { out });

    // And the VM can be snapshotted again, by the strategy qsnap picks itself.
    const fresh = join(sandbox.out, 'after-kill.qsnap');
    const r = await snapshot({ qmp: guest.vm.qmpPath, out: fresh }).result;
    expect(r.disks[0]!.frozenFile).toBe(chainAfter[0]);
    await expectIntact(sandbox, guest, { out: fresh, outIs: 'valid' });
  });
});
