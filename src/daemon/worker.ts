/**
 * A worker thread that runs one stream operation (snapshot, restore, verify) of the store, so
 * that parsing and writing the RAM stream never holds the daemon's event loop: a status request
 * is answered while a snapshot streams (docs/api.md has the measured latency).
 *
 * In: workerData (WorkerTask). Out: messages (WorkerMessage) — the operation's events, then
 * its result or its error as data. The main thread posts `{cancel: true}` to cancel it.
 */
import { parentPort, workerData } from 'node:worker_threads';
import type { Operation } from '../engine/operation.js';
import { verifySnapshot } from '../engine/verify.js';
import { asQsnapError } from '../errors.js';
import { findSnapshot, storeRestore } from '../store/restore.js';
import { storeSnapshot } from '../store/snapshot.js';
import { Store } from '../store/store.js';
import type { WorkerMessage, WorkerTask } from './worker-host.js';

async function start(task: WorkerTask): Promise<Operation<object>> {
  const store = await Store.open({ dir: task.storeDir, stateDir: task.stateDir });
  switch (task.kind) {
    case 'snapshot':
      return storeSnapshot(store, { ...task.options, faults: task.faults });
    case 'restore':
      return storeRestore(store, task.options);
    case 'verify':
      return verifySnapshot(store.snapshotPath(findSnapshot(await store.read(), task.name)));
  }
}

function post(message: WorkerMessage): void {
  parentPort!.postMessage(message);
}

async function main(): Promise<void> {
  const task = workerData as WorkerTask;
  let op: Operation<object>;
  try {
    op = await start(task);
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
