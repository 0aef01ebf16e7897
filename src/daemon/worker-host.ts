import { Worker } from 'node:worker_threads';
import type { Faults } from '../engine/faults.js';
import type { OperationEvent } from '../engine/operation.js';
import { QsnapError, type QsnapErrorJson } from '../errors.js';
import type { StoreRestoreOptions } from '../store/restore.js';
import type { StoreSnapshotOptions } from '../store/snapshot.js';
import { DaemonError } from './errors.js';

/** What a worker thread runs (worker.ts); everything in it crosses as structured-clone data. */
export type WorkerTask = { storeDir: string; stateDir: string } & (
  | { kind: 'snapshot'; options: Omit<StoreSnapshotOptions, 'faults'>; faults: Faults }
  | { kind: 'restore'; options: StoreRestoreOptions }
  | { kind: 'verify'; name: string }
);

export type WorkerMessage =
  | { type: 'event'; event: OperationEvent }
  | { type: 'result'; result: Record<string, unknown> }
  | { type: 'error'; error: QsnapErrorJson };

export interface WorkerRun {
  result: Promise<Record<string, unknown>>;
  cancel(): void;
}

/**
 * Raw fds are not tracked: the snapshot's pipe is opened with fs (pipe-source.ts) and closed by
 * the net.Socket that reads it, so Node's tracking would close that fd number a second time
 * when the worker exits — by then another thread's fd (a libuv signal pipe: the daemon aborted).
 */
export const WORKER_OPTIONS = { trackUnmanagedFds: false } as const;

/** worker.js beside this module: dist/daemon/worker.js when the daemon runs from dist. */
const WORKER_URL = new URL('./worker.js', import.meta.url);

/** Run a task in a new worker thread; its events go to `onEvent`, its error is a QsnapError again. */
export function runInWorker(
  task: WorkerTask,
  onEvent: (event: OperationEvent) => void,
  options: { inline?: boolean } = {},
): WorkerRun {
  if (options.inline) return runInline(task, onEvent);
  const worker = new Worker(WORKER_URL, { workerData: task, ...WORKER_OPTIONS });
  const result = new Promise<Record<string, unknown>>((resolve, reject) => {
    let settled = false;
    worker.on('message', (m: WorkerMessage) => {
      if (m.type === 'event') onEvent(m.event);
      else if (m.type === 'result') {
        settled = true;
        resolve(m.result);
      } else {
        settled = true;
        reject(errorFromJson(m.error));
      }
    });
    worker.on('error', (err) => {
      settled = true;
      reject(
        new DaemonError('QSNAP_DAEMON_WORKER', `the worker running ${task.kind} failed: ${err.message}`, {
          hint: 'this is a bug in qsnap; the VM was left as the operation left it (qsnap status shows it)',
          cause: err,
        }),
      );
    });
    worker.on('exit', (code) => {
      if (!settled)
        reject(
          new DaemonError('QSNAP_DAEMON_WORKER', `the worker running ${task.kind} exited (${code})`, {
            hint: 'this is a bug in qsnap; the next operation on the VM recovers it',
          }),
        );
    });
  });
  return { result, cancel: () => worker.postMessage({ cancel: true }) };
}

/**
 * The same task on this thread's event loop (`QSNAP_DAEMON_INLINE=1`): only for measuring what
 * the worker threads buy (scripts/bench-daemon.mjs --inline).
 */
function runInline(task: WorkerTask, onEvent: (event: OperationEvent) => void): WorkerRun {
  let cancel: () => void = () => undefined;
  const result = import('./tasks.js').then(async ({ startTask }) => {
    const op = await startTask(task);
    cancel = () => op.cancel();
    op.on(onEvent);
    const { vm: _vm, ...data } = (await op.result) as Record<string, unknown>;
    return data;
  });
  return { result, cancel: () => cancel() };
}

/** An error that crossed a thread or a wire, as a QsnapError with the same code, hint and details. */
export function errorFromJson(json: QsnapErrorJson): QsnapError {
  return new QsnapError(json.code, json.message, {
    ...(json.hint ? { hint: json.hint } : {}),
    ...(json.details ? { details: json.details } : {}),
    ...(json.cause ? { cause: json.cause } : {}),
  });
}
