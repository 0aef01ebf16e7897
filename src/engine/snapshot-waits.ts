/**
 * Waiting on QEMU during a snapshot: promises that reject when the migration fails, QEMU goes
 * away, the operation is cancelled or time runs out, and polls for the migration's end.
 */
import type { QsnapError } from '../errors.js';
import type { QmpClient } from '../qmp/index.js';
import { SnapshotError } from './errors.js';

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
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute('query-migrate');
    const status = info.status ?? 'none';
    if (!['active', 'setup', 'device', 'cancelling', 'pre-switchover', 'wait-unplug'].includes(status))
      return status;
    if (Date.now() > deadline) return status;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** After the stream's end QEMU marks the migration completed; wait for that (it may lag the socket). */
export async function waitMigrationCompleted(qmp: QmpClient): Promise<void> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const info = await qmp.execute('query-migrate');
    if (info.status === 'completed') return;
    if (info.status === 'failed' || info.status === 'cancelled') {
      throw new SnapshotError(
        'QSNAP_SNAPSHOT_MIGRATION',
        `QEMU's migration ${info.status}${info['error-desc'] ? `: ${info['error-desc']}` : ''}`,
        {
          hint: 'see the message; no snapshot was written',
        },
      );
    }
    if (Date.now() > deadline) {
      throw new SnapshotError(
        'QSNAP_SNAPSHOT_MIGRATION',
        `the stream ended but QEMU still reports the migration ${info.status}`,
        {
          hint: 'check the QEMU log; no snapshot was written',
        },
      );
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}
