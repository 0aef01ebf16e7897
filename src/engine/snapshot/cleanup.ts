import { QsnapError } from '../../errors.js';
import { QmpClient } from '../../qmp/index.js';
import { discardOverlays, type PlannedOverlay } from '../disks/freeze.js';
import { type RollbackOutcome, rollbackOverlays } from '../disks/rollback.js';
import { SnapshotError } from '../errors.js';
import { MIGRATION_UNSETTLED, restoreMigration } from '../migration.js';
import type { SnapshotContext, SnapshotRun } from './context.js';
import { qemuGoneError, waitMigrationSettled, waitRunStateSettled } from './waits.js';

type GuestAfter = 'running' | 'paused' | 'gone';

/** What putting the VM back achieved: notes for the user, disks left on a new overlay. */
interface Restitution {
  guest: GuestAfter;
  notes: string[];
  unrolled: RollbackOutcome[];
}

/**
 * Put everything back after a failure and say so in the error: the guest runs again if it
 * ran before, the migration ends, the partial file is gone, unused overlays are removed,
 * disks already switched to their overlay are committed back (or named).
 */
export async function cleanupAfterFailure(
  ctx: SnapshotContext,
  run: SnapshotRun,
  err: unknown,
): Promise<QsnapError> {
  const done: Restitution = { guest: 'gone', notes: [], unrolled: [] };
  await run.receiver.abort(err);
  await run.writer?.abort(err);
  const reconnected = ctx.qmp.state === 'running' ? undefined : await reconnect(ctx);
  if (reconnected) done.notes.push('QMP connection lost; qsnap reconnected to put the VM back');
  try {
    await restitute(ctx, run, done);
  } finally {
    await reconnected?.close();
  }
  return rootCause(ctx, err, done, reconnected !== undefined);
}

/**
 * A QMP connection closed by the peer while QEMU runs on (a proxy, a monitor reset): connect
 * again, so the VM can still be put back. The intent record is still this qsnap's.
 */
async function reconnect(ctx: SnapshotContext): Promise<QmpClient | undefined> {
  try {
    const qmp = await QmpClient.connect(ctx.options.qmp, { connectTimeoutMs: 1500 });
    ctx.qmp = qmp;
    return qmp;
  } catch {
    return undefined;
  }
}

async function restitute(ctx: SnapshotContext, run: SnapshotRun, done: Restitution): Promise<void> {
  if (ctx.qmp.state !== 'running') {
    if (run.pause.frozen) done.unrolled.push(...notRolledBack(ctx.overlays));
  } else {
    try {
      if (run.pause.migrating) done.notes.push(...(await endMigration(ctx)));
      done.notes.push(...(await resumeIfStopped(ctx)));
      done.guest = ctx.vm.running ? 'running' : 'paused';
      await putDisksBack(ctx, run, done);
      if (run.settings) await restoreMigration(ctx.qmp, run.settings);
    } catch (cleanupError) {
      if (ctx.qmp.state === 'running')
        ctx.op.warn(
          'QSNAP_CLEANUP',
          `cleanup after the failure was incomplete: ${(cleanupError as Error).message}`,
        );
    }
  }
}

function notRolledBack(overlays: PlannedOverlay[]): RollbackOutcome[] {
  return overlays.map((o) => ({ device: o.device, overlayFile: o.overlayFile, rolledBack: false }));
}

async function endMigration(ctx: SnapshotContext): Promise<string[]> {
  const { qmp } = ctx;
  if (ctx.strategy === 'background-snapshot') {
    // Never cancel a background snapshot QEMU has begun (drain-guard.ts): the drain guard
    // reads the rest of the stream and QEMU finishes it normally. Whether QEMU has connected
    // yet is no guide: it connects asynchronously after `migrate`, and the receiver, still
    // listening, hands a late connection to the guard as well.
    const final = await waitMigrationSettled(qmp, 30 * 60_000);
    return [`QEMU's migration ran to its end (${final}) so the guest's RAM is released`];
  }
  // A pre-copy whose stream qsnap closed (receiver.abort) may have failed already.
  const info = await qmp.execute('query-migrate');
  const status = info.status ?? 'none';
  if (!MIGRATION_UNSETTLED.has(status))
    return status === 'failed' || status === 'cancelled' ? [`the migration ended (${status})`] : [];
  await qmp.execute('migrate_cancel');
  await waitMigrationSettled(qmp, 60_000);
  return ['migration cancelled'];
}

async function resumeIfStopped(ctx: SnapshotContext): Promise<string[]> {
  if (!ctx.vm.running) return [];
  // A cancelled or failed pre-copy migration resumes a guest it stopped itself, just after
  // its status changed; a completed one leaves it `postmigrate`.
  const status = await waitRunStateSettled(ctx.qmp);
  if (status.running) return [];
  await ctx.qmp.execute('cont');
  return ['guest resumed'];
}

/**
 * Frozen disks: merge what the guest wrote since the freeze back and drop the overlays, so the
 * VM's disk layout is as before the failed snapshot. Not yet frozen: drop the unused overlays.
 */
async function putDisksBack(ctx: SnapshotContext, run: SnapshotRun, done: Restitution): Promise<void> {
  if (!run.pause.frozen) {
    for (const o of await discardOverlays(ctx.qmp, ctx.overlays))
      done.notes.push(`overlay ${o.overlayFile} kept (in use)`);
    return;
  }
  for (const outcome of await rollbackOverlays(ctx.qmp, ctx.overlays)) {
    if (outcome.rolledBack) done.notes.push(`disk ${outcome.device} is back on its original image`);
    else {
      done.unrolled.push(outcome);
      done.notes.push(`disk ${outcome.device} now writes to ${outcome.overlayFile} (${outcome.error})`);
    }
  }
}

/**
 * The error to report, with what was put back. A dead QEMU is often noticed first as the end of
 * its stream (QSNAP_STREAM_TRUNCATED) or a failed command; the cleanup's queries settle which,
 * and the root cause is named.
 */
function rootCause(ctx: SnapshotContext, err: unknown, done: Restitution, reconnected: boolean): QsnapError {
  const gone =
    ctx.qmp.state !== 'running' && !(err instanceof QsnapError && err.code === 'QSNAP_SNAPSHOT_QEMU_GONE');
  const base = reconnected
    ? new SnapshotError(
        'QSNAP_SNAPSHOT_QMP_LOST',
        'the QMP connection to QEMU closed in the middle of the snapshot',
        {
          hint: 'QEMU still runs and was put back; check what else talks to its QMP socket, then retry',
          cause: err,
        },
      )
    : gone
      ? qemuGoneError(err)
      : err instanceof QsnapError
        ? err
        : new SnapshotError(
            'QSNAP_SNAPSHOT_FAILED',
            `snapshot failed: ${(err as Error)?.message ?? String(err)}`,
            {
              cause: err,
            },
          );
  base.details['guest'] = done.guest;
  base.details['cleanup'] = done.notes;
  if (done.unrolled.length)
    base.details['disks'] = done.unrolled.map((o) => ({ device: o.device, overlayFile: o.overlayFile }));
  return base;
}
