/**
 * A worker thread that runs one stream operation (snapshot, restore, verify) of the store, so
 * that parsing and writing the RAM stream never holds the daemon's event loop: a status request
 * is answered while a snapshot streams (docs/api.md has the measured latency).
 *
 * In: workerData (WorkerTask). Out: messages (WorkerMessage) — the operation's events, then
 * its result or its error as data. The main thread posts `{cancel: true}` to cancel it.
 */
import { getPriority, setPriority } from 'node:os';
import { parentPort, workerData } from 'node:worker_threads';
import type { Operation } from '../engine/operation.js';
import { asQsnapError } from '../errors.js';
import { startTask } from './tasks.js';
import type { WorkerMessage, WorkerTask } from './worker-host.js';

function post(message: WorkerMessage): void {
  parentPort!.postMessage(message);
}

/**
 * The stream work yields to the daemon's own thread: on Linux a nice value is per thread, and
 * os.setPriority() without a pid sets this thread's alone. When the host's cores are all busy
 * (QEMU's vCPU and migration threads, this thread), the thread that answers `status` is then
 * the one the scheduler runs first (docs/api.md has the figures).
 */
const STREAM_THREAD_NICER_BY = 5;

async function main(): Promise<void> {
  try {
    setPriority(Math.min(19, getPriority() + STREAM_THREAD_NICER_BY));
  } catch {
    // Not on this platform: the stream runs at the daemon's priority.
  }
  const task = workerData as WorkerTask;
  let op: Operation<object>;
  try {
    op = await startTask(task);
  } catch (err) {
    post({ type: 'error', error: asQsnapError(err).toJSON() });
    return;
  }
  parentPort!.on('message', (m: { cancel?: boolean }) => {
    if (m.cancel) op.cancel();
  });
  op.on((event) => post({ type: 'event', event }));
  try {
    const result = await op.result;
    // A restored VM attached to this thread would be a Vm object; the daemon only runs detached ones.
    const { vm: _vm, ...data } = result as Record<string, unknown>;
    post({ type: 'result', result: data });
  } catch (err) {
    post({ type: 'error', error: asQsnapError(err).toJSON() });
  } finally {
    parentPort!.close();
  }
}

void main();
