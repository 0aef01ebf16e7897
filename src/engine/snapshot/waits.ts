/**
 * Waiting on QEMU during a snapshot: promises that reject when the migration fails, QEMU goes
 * away, the operation is cancelled or time runs out, and polls for the migration's end.
 */
import type { QsnapError } from '../../errors.js';
import type { CommandReturn, QmpClient } from '../../qmp/index.js';
import { SnapshotError } from '../errors.js';
import { MIGRATION_ENDED, MIGRATION_UNSETTLED, pollMigration } from '../migration.js';

/** Resolves never; rejects when QEMU reports the migration failed or cancelled. */
export function watchMigrationFailure(qmp: QmpClient): { promise: Promise<never>; cancel: () => void } {
  let off = () => {};
  const promise = new Promise<never>((_, reject) => {
    off = qmp.on('MIGRATION', (e) => {
      const status = e.data.status;
      if (status === 'failed' || status === 'cancelled') {
        void qmp
          .execute('query-migrate')
          .catch(() => undefined)
          .then((info) => {
            const desc = info?.['error-desc'];
            reject(
              new SnapshotError(
                'QSNAP_SNAPSHOT_MIGRATION',
                `QEMU's migration ${status}${desc ? `: ${desc}` : ''}`,
                {
                  hint: 'see the message; the guest was resumed and its disks are intact',
                  details: { status, desc },
                },
              ),
            );
          });
      }
    });
  });
  promise.catch(() => undefined);
  return { promise, cancel: () => off() };
}

export function qemuGoneError(cause: unknown): SnapshotError {
  return new SnapshotError('QSNAP_SNAPSHOT_QEMU_GONE', 'QEMU went away during the snapshot', {
    hint: 'check whether QEMU crashed or was killed; no snapshot was written',
    cause,
  });
}

export function qemuGone(qmp: QmpClient): Promise<never> {
  return new Promise<never>((_, reject) => {
    qmp.onDisconnect((cause) => reject(qemuGoneError(cause)));
  });
}

export function cancelled(signal: AbortSignal): Promise<never> {
  return new Promise<never>((_, reject) => {
    const fail = () =>
      reject(
        new SnapshotError('QSNAP_SNAPSHOT_CANCELLED', 'the snapshot was cancelled', {
          hint: 'no snapshot was written; the guest keeps running',
        }),
      );
    if (signal.aborted) fail();
    else signal.addEventListener('abort', fail, { once: true });
  });
}

export function timeout(ms: number, error: () => QsnapError): { promise: Promise<never>; clear: () => void } {
  let timer: NodeJS.Timeout | undefined;
  const promise = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(error()), ms);
  });
  promise.catch(() => undefined);
  return { promise, clear: () => clearTimeout(timer) };
}

/** Wait until QEMU's migration is over, whatever the outcome; returns its final status. */
export async function waitMigrationSettled(qmp: QmpClient, timeoutMs: number): Promise<string> {
  const { info } = await pollMigration(qmp, {
    done: (status) => !MIGRATION_UNSETTLED.has(status),
    intervalMs: 20,
    timeoutMs,
  });
  return info.status ?? 'none';
}

/** After the stream's end QEMU marks the migration completed; wait for that (it may lag the socket). */
export async function waitMigrationCompleted(qmp: QmpClient): Promise<void> {
  const { info, timedOut } = await pollMigration(qmp, {
    done: (status) => MIGRATION_ENDED.has(status),
    intervalMs: 10,
    timeoutMs: 30_000,
  });
  if (timedOut) {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_MIGRATION',
      `the stream ended but QEMU still reports the migration ${info.status}`,
      { hint: 'check the QEMU log; no snapshot was written' },
    );
  }
  if (info.status !== 'completed') {
    throw new SnapshotError(
      'QSNAP_SNAPSHOT_MIGRATION',
      `QEMU's migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`,
      { hint: 'see the message; no snapshot was written' },
    );
  }
}

/**
 * The run state once QEMU has left `finish-migrate`: a migration thread that completed or
 * failed sets the final state (postmigrate, or running again) only after the migration status
 * changed (migration_iteration_finish), and a `cont` sent in between would be overridden.
 */
export async function waitRunStateSettled(
  qmp: QmpClient,
  timeoutMs = 30_000,
): Promise<CommandReturn<'query-status'>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await qmp.execute('query-status');
    if (status.status !== 'finish-migrate' || Date.now() > deadline) return status;
    await new Promise((r) => setTimeout(r, 1));
  }
}
