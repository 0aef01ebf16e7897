import { QsnapError } from '../../errors.js';
import type { SnapshotWriter } from '../../format/index.js';
import type { PlannedOverlay } from '../disks/freeze.js';
import { discardOverlays } from '../disks/freeze.js';
import { type RollbackOutcome, rollbackOverlays } from '../disks/rollback.js';
import { SnapshotError } from '../errors.js';
import { type MigrationSettings, restoreMigration } from '../migration.js';
import type { StreamReceiver } from './receiver.js';
import type { LockedContext, PauseState } from './snapshot.js';
import { qemuGoneError, waitMigrationSettled } from './waits.js';

function overlayOutcomes(overlays: PlannedOverlay[]): RollbackOutcome[] {
  return overlays.map((o) => ({ device: o.device, overlayFile: o.overlayFile, rolledBack: false }));
}

/**
 * Put everything back after a failure and say so in the error: the guest runs again if it
 * ran before, the migration is cancelled, the partial file is gone, unused overlays are
 * removed, disks already switched to their overlay are committed back (or named).
 */
export async function cleanupAfterFailure(
  ctx: LockedContext,
  err: unknown,
  state: {
    receiver: StreamReceiver;
    writer: SnapshotWriter | undefined;
    pause: PauseState;
    settings: MigrationSettings | undefined;
  },
): Promise<unknown> {
  const { qmp, vm, op } = ctx;
  const notes: string[] = [];
  const unrolled: RollbackOutcome[] =
    state.pause.frozen && qmp.state !== 'running' ? overlayOutcomes(ctx.overlays) : [];
  let guest: 'running' | 'paused' | 'gone' = 'gone';
  await state.receiver.abort(err);
  await state.writer?.abort(err);
  if (qmp.state === 'running') {
    try {
      if (state.pause.migrating) {
        if (ctx.strategy === 'background-snapshot') {
          // Never cancel a background snapshot QEMU has begun (see receiver.ts): the drain
          // guard reads the rest of the stream and QEMU finishes it normally. Whether QEMU has
          // connected yet is no guide: it connects asynchronously after `migrate`, and the
          // receiver, still listening, hands a late connection to the guard as well.
          const final = await waitMigrationSettled(qmp, 30 * 60_000);
          notes.push(`QEMU's migration ran to its end (${final}) so the guest's RAM is released`);
        } else {
          const info = await qmp.execute('query-migrate');
          if (info.status === 'active' || info.status === 'setup' || info.status === 'device') {
            await qmp.execute('migrate_cancel');
            await waitMigrationSettled(qmp, 60_000);
            notes.push('migration cancelled');
          }
        }
      }
      const status = await qmp.execute('query-status');
      if (vm.running && !status.running) {
        await qmp.execute('cont');
        notes.push('guest resumed');
      }
      guest = vm.running ? 'running' : 'paused';
      if (state.pause.frozen) {
        // Merge what the guest wrote since the freeze back and drop the overlays: the VM's
        // disk layout is as before the failed snapshot.
        for (const outcome of await rollbackOverlays(qmp, ctx.overlays)) {
          if (outcome.rolledBack) notes.push(`disk ${outcome.device} is back on its original image`);
          else {
            unrolled.push(outcome);
            notes.push(`disk ${outcome.device} now writes to ${outcome.overlayFile} (${outcome.error})`);
          }
        }
      } else {
        const kept = await discardOverlays(qmp, ctx.overlays);
        for (const o of kept) notes.push(`overlay ${o.overlayFile} kept (in use)`);
      }
      if (state.settings) await restoreMigration(qmp, state.settings);
    } catch (cleanupError) {
      if (qmp.state === 'running')
        op.warn(
          'QSNAP_CLEANUP',
          `cleanup after the failure was incomplete: ${(cleanupError as Error).message}`,
        );
    }
  }
  // A dead QEMU is often noticed first as the end of its stream (QSNAP_STREAM_TRUNCATED) or
  // a failed command; the cleanup's queries settle which: name the root cause.
  const gone =
    qmp.state !== 'running' && !(err instanceof QsnapError && err.code === 'QSNAP_SNAPSHOT_QEMU_GONE');
  const base = gone
    ? qemuGoneError(err)
    : err instanceof QsnapError
      ? err
      : new SnapshotError(
          'QSNAP_SNAPSHOT_FAILED',
          `snapshot failed: ${(err as Error)?.message ?? String(err)}`,
          { cause: err },
        );
  base.details['guest'] = guest;
  base.details['cleanup'] = notes;
  if (unrolled.length)
    base.details['disks'] = unrolled.map((o) => ({ device: o.device, overlayFile: o.overlayFile }));
  return base;
}
