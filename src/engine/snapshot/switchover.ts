import { SnapshotError } from '../errors.js';
import { hangForever } from '../faults.js';
import type { MigrationInfo } from '../migration.js';
import type { SnapshotContext, SnapshotRun } from './context.js';
import { freezeDisks, freezeEarly, startMigration } from './pause.js';
import { downtimeLimitAt, precopyTuning } from './tuning.js';
import type { PrecopyReport } from './types.js';
import { cancelled, qemuGone } from './waits.js';

/**
 * live-precopy: a snapshot of a running guest whose RAM QEMU cannot write-protect. A pre-copy
 * migration with pause-before-switchover sends RAM while the guest runs, resending what it
 * dirties; when the rest fits the downtime limit QEMU stops the guest (run state
 * finish-migrate) and waits in migration state `pre-switchover` (7.2 and 10.0, verified). In
 * that pause qsnap freezes the disks and sends `migrate-continue`; QEMU sends the last dirty
 * pages and the device state and completes, leaving the guest in `postmigrate`; qsnap resumes
 * it with `cont` (which also takes back the images QEMU inactivated). The point in time is the
 * switchover pause: RAM, devices and disks as of that instant.
 *
 * A failure before the switchover needs nothing special: `migrate_cancel` ends a pre-copy
 * migration safely in any state, and QEMU resumes a guest it stopped (cleanup.ts).
 */

/** `migrate`, let RAM converge while the guest runs, then freeze the disks in QEMU's pause. */
export async function precopyUntilSwitchover(
  ctx: SnapshotContext,
  run: SnapshotRun,
  failed: Promise<never>,
): Promise<void> {
  const { qmp } = ctx;
  const reached = qmp.waitFor('MIGRATION', (e) => e.data.status === 'pre-switchover');
  reached.catch(() => undefined);
  const startedAt = performance.now();
  await startMigration(ctx, run, failed);
  if (ctx.faults.has('precopy-freeze-early')) await freezeEarly(ctx, run);
  ctx.op.phase('precopy');
  const limits = raiseDowntimeLimit(ctx, startedAt);
  try {
    await Promise.race([reached, failed, endedEarly(run), qemuGone(qmp), cancelled(ctx.op.signal)]);
  } finally {
    limits.stop();
  }
  ctx.op.phase('pause');
  void ctx.intent.update({ stage: 'paused' }).catch(() => undefined);
  const info = qmp.execute('query-migrate');
  info.catch(() => undefined);
  if (!run.pause.frozen) await freezeDisks(ctx, run);
  run.precopy = report(await info, performance.now() - startedAt, limits.current());
  if (ctx.faults.has('in-switchover')) {
    await ctx.intent.update({});
    hangForever();
  }
  if (ctx.faults.has('switchover-error'))
    throw new SnapshotError('QSNAP_SNAPSHOT_MIGRATION', 'injected fault: failed in the switchover pause');
  // QEMU lifts its own rate limit for the rest (migration_completion); so does qsnap.
  run.receiver.liftRateLimit();
  await qmp.execute('migrate-continue', { state: 'pre-switchover' });
  ctx.op.phase('switchover');
}

/** The stream cannot end before the switchover; if it does, QEMU's migration failed. */
async function endedEarly(run: SnapshotRun): Promise<never> {
  await run.receiver.done;
  throw new SnapshotError('QSNAP_SNAPSHOT_MIGRATION', 'the migration stream ended before the switchover', {
    hint: 'check the QEMU log; the guest keeps running and no snapshot was written',
  });
}

/**
 * Raise QEMU's downtime limit while no switchover comes (migrate-set-parameters applies to a
 * migration under way: QEMU recomputes its threshold every 100 ms). A limit QEMU refuses is a
 * warning, not a failure: auto-converge may still get there.
 */
function raiseDowntimeLimit(
  ctx: SnapshotContext,
  startedAt: number,
): { stop: () => void; current: () => number } {
  const tuning = precopyTuning(ctx.options.precopy);
  let current = tuning.downtimeLimitMs;
  const tick = () => {
    const limit = downtimeLimitAt(tuning, performance.now() - startedAt);
    if (limit !== current)
      void setDowntimeLimit(ctx, limit).then(
        () => (current = limit),
        () => undefined,
      );
  };
  const raise = setInterval(tick, tuning.raiseAfterMs);
  const force = setTimeout(tick, tuning.forceAfterMs);
  return {
    stop: () => {
      clearInterval(raise);
      clearTimeout(force);
    },
    current: () => current,
  };
}

async function setDowntimeLimit(ctx: SnapshotContext, limitMs: number): Promise<void> {
  await ctx.qmp.execute('migrate-set-parameters', { 'downtime-limit': limitMs }).catch((err) => {
    ctx.op.warn('QSNAP_MIGRATION_SETTINGS', `could not raise the downtime limit: ${(err as Error).message}`);
    throw err;
  });
}

function report(info: MigrationInfo, precopyMs: number, downtimeLimitMs: number): PrecopyReport {
  return {
    precopyMs,
    passes: info.ram?.['dirty-sync-count'] ?? 0,
    downtimeLimitMs,
    throttlePercent: info['cpu-throttle-percentage'] ?? 0,
  };
}
