import { join } from 'node:path';
import { flushImages, freezeActions, prepareOverlays } from '../disks/freeze.js';
import { SnapshotError } from '../errors.js';
import { hangForever } from '../faults.js';
import { configureMigration } from '../migration.js';
import { versionAtLeast } from '../probe.js';
import type { SnapshotContext, SnapshotRun } from './context.js';
import { cancelled, qemuGone, timeout } from './waits.js';

/**
 * The steps around the guest's pause: everything that can be done while it runs is done
 * before (migration settings, overlays opened, the socket listening, images flushed); in the
 * pause only `stop`, one transaction and `migrate`; the guest resumes as soon as QEMU has
 * captured the device state.
 */

/** While the guest runs: qsnap's migration settings, the overlays opened in QEMU, the socket. */
export async function prepare(ctx: SnapshotContext, run: SnapshotRun): Promise<void> {
  const { qmp, intent } = ctx;
  ctx.op.phase('prepare');
  run.settings = await configureMigration(qmp, {
    background: ctx.strategy === 'background-snapshot',
    maxBandwidth: ctx.options.maxBandwidth,
  });
  await intent.update({ tempFiles: [run.socketDir], migration: run.settings.saved });
  await prepareOverlays(qmp, ctx.overlays);
  await run.receiver.listen();
  await intent.update({ stage: 'paused' });
  // Write the images' dirty host pages out now, so the flush QEMU does inside the
  // transaction (in the pause) has little left to do.
  await flushImages(ctx.overlays);
}

/** Pause the guest (if it runs) and switch every disk to its overlay in one transaction. */
export async function pauseAndFreeze(ctx: SnapshotContext, run: SnapshotRun): Promise<void> {
  const { qmp, overlays } = ctx;
  ctx.op.phase('pause');
  // stop and transaction are sent back to back: QMP runs them in order, one round trip less.
  const stopped = ctx.vm.running ? qmp.execute('stop') : Promise.resolve();
  if (ctx.faults.has('after-stop')) {
    await stopped;
    hangForever();
  }
  const freeze = overlays.length
    ? qmp.execute('transaction', { actions: freezeActions(overlays) }).catch((err: unknown) => {
        throw new SnapshotError(
          'QSNAP_SNAPSHOT_DISK',
          `QEMU could not freeze the disks: ${(err as Error).message}`,
          {
            hint: 'check the disks with qsnap status; the guest was resumed and nothing changed',
            cause: err,
          },
        );
      })
    : Promise.resolve();
  freeze.catch(() => undefined);
  await stopped;
  await freeze;
  if (overlays.length === 0) return;
  run.pause.frozen = true;
  // Recorded without waiting (the guest is paused); the next update waits for it. Until
  // then a recovery still keeps these files: QEMU refuses to delete a node in use.
  void ctx.intent
    .update({ overlays: ctx.intent.current.overlays.map((o) => ({ ...o, inUse: true })) })
    .catch(() => undefined);
  ctx.op.phase('frozen');
}

/** `migrate` to qsnap's socket; for a background snapshot, resume the guest once QEMU captured. */
export async function startMigration(
  ctx: SnapshotContext,
  run: SnapshotRun,
  migrationFailed: Promise<never>,
): Promise<void> {
  const socket = ctx.faults.has('bad-migration-socket') ? 'nobody.sock' : 'migration.sock';
  await ctx.qmp.execute('migrate', { uri: `unix:${join(run.socketDir, socket)}` });
  run.pause.migrating = true;
  if (ctx.faults.has('fail-after-migrate'))
    throw new SnapshotError('QSNAP_SNAPSHOT_MIGRATION', 'injected fault: failed right after migrate');
  ctx.op.phase('migrating');
  if (ctx.strategy !== 'background-snapshot') return;
  await waitForCapture(ctx, run, migrationFailed);
  if (ctx.vm.running) await resumeAfterCapture(ctx, run);
}

async function waitForCapture(ctx: SnapshotContext, run: SnapshotRun, failed: Promise<never>): Promise<void> {
  const timeoutMs = ctx.options.captureTimeoutMs ?? 60_000;
  const limit = timeout(
    timeoutMs,
    () =>
      new SnapshotError(
        'QSNAP_SNAPSHOT_MIGRATION',
        `QEMU did not capture the device state within ${timeoutMs} ms`,
        {
          hint: 'the host may be overloaded; the guest was resumed and no snapshot was written',
        },
      ),
  );
  try {
    await Promise.race([
      run.receiver.captured,
      run.receiver.done.then(() => undefined),
      failed,
      qemuGone(ctx.qmp),
      cancelled(ctx.op.signal),
      limit.promise,
    ]);
  } finally {
    limit.clear();
  }
  ctx.op.phase('captured');
}

/**
 * QEMU 7.2–8.2 resume the guest by themselves right after the capture; ≥ 9.0 restore the
 * run state from before `migrate` (paused, since we stopped it), so qsnap resumes it — only
 * now, once the first RAM section proves the capture is done.
 */
async function resumeAfterCapture(ctx: SnapshotContext, run: SnapshotRun): Promise<void> {
  const { qmp } = ctx;
  if (versionAtLeast(ctx.vm.qemu.version, 9, 0)) await qmp.execute('cont');
  if (!run.pause.resumeEvent) {
    try {
      await qmp.waitFor('RESUME', undefined, { timeoutMs: 5000 });
    } catch {
      const status = await qmp.execute('query-status');
      if (!status.running) {
        ctx.op.warn('QSNAP_RESUME_LATE', 'QEMU did not resume the guest after the capture; qsnap resumed it');
        await qmp.execute('cont');
        await qmp.waitFor('RESUME', undefined, { timeoutMs: 5000 }).catch(() => undefined);
      }
    }
  }
  ctx.op.phase('resumed');
}
